// openai_llama_client.mjs — the official `openai` npm SDK against a baton frontend whose worker runs
// the llama engine with the bundled TinyStories model (models/README.md).
//
// Run by tests/compat/test_openai_llama.py from a directory whose node_modules holds the SDK.
// Environment: BATON_BASE_URL, BATON_MODEL, BATON_EXPECT_TEXT (the model's greedy continuation of
// "Once upon a time", 64 tokens). Prints one JSON object: {"sdk", "checks": [{"name", "ok",
// "detail"}...]}; every check runs even if an earlier one failed.
import OpenAI from 'openai';
import { readFileSync } from 'node:fs';

const sdkVersion = JSON.parse(
  readFileSync(new URL('./node_modules/openai/package.json', import.meta.url), 'utf8')).version;
const baseURL = process.env.BATON_BASE_URL;
const model = process.env.BATON_MODEL || 'stories260K';
const want = process.env.BATON_EXPECT_TEXT;
if (!baseURL || !want) {
  console.error('BATON_BASE_URL and BATON_EXPECT_TEXT must be set');
  process.exit(2);
}
// maxRetries 0: a failure must show, not be retried away by the SDK.
const client = new OpenAI({ baseURL, apiKey: 'unused', maxRetries: 0, timeout: 60_000 });
const checks = [];

async function check(name, fn) {
  try {
    checks.push({ name, ok: true, detail: await fn() });
  } catch (e) {
    checks.push({ name, ok: false, detail: String(e && e.stack ? e.stack : e) });
  }
}

function expect(cond, what) {
  if (!cond) throw new Error(`expected ${what}`);
}

await check('models.list', async () => {
  const page = await client.models.list();
  const ids = page.data.map((m) => m.id);
  expect(ids.includes(model), `${model} in ${JSON.stringify(ids)}`);
  return ids;
});

await check('completions.greedy_text', async () => {
  const r = await client.completions.create({ model, prompt: 'Once upon a time', max_tokens: 64, temperature: 0 });
  const text = r.choices && r.choices[0] ? r.choices[0].text : undefined;
  expect(text === want, `the model's greedy text, got ${JSON.stringify(text)}`);
  expect(r.usage && r.usage.prompt_tokens === 5 && r.usage.completion_tokens === 64,
    `usage 5 + 64, got ${JSON.stringify(r.usage)}`);
  expect(r.choices[0].finish_reason === 'length', `finish_reason length, got ${r.choices[0].finish_reason}`);
  return { usage: r.usage };
});

await check('completions.stream_greedy_text', async () => {
  const stream = await client.completions.create({
    model, prompt: 'Once upon a time', max_tokens: 64, temperature: 0, stream: true,
  });
  let text = '';
  let finish = null;
  for await (const chunk of stream) {
    const c = chunk.choices && chunk.choices[0];
    if (c && c.text) text += c.text;
    if (c && c.finish_reason) finish = c.finish_reason;
  }
  expect(text === want, `the streamed greedy text equal to the unary one, got ${JSON.stringify(text)}`);
  expect(finish === 'length', `finish_reason length, got ${finish}`);
  return { chars: text.length };
});

await check('chat.stream_seeded', async () => {
  const run = async () => {
    const stream = await client.chat.completions.create({
      model, messages: [{ role: 'user', content: 'Tell me a story' }], max_tokens: 40, temperature: 0.8,
      seed: 1234, stream: true,
    });
    let text = '';
    for await (const chunk of stream) {
      const d = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (d && d.content) text += d.content;
    }
    return text;
  };
  const a = await run();
  const b = await run();
  expect(a.length > 0, 'some text');
  expect(a === b, `the same seed gives the same text: ${JSON.stringify(a)} / ${JSON.stringify(b)}`);
  return { chars: a.length };
});

// top_p 0 is the smallest nucleus (OpenAI): only the most probable token, so at temperature 1 every
// seed gives the greedy text; the same seeds at top_p 1 must not all give it (sampling is on).
await check('completions.top_p_zero_greedy', async () => {
  const seeds = [1, 2, 3, 4, 5];
  const textOf = async (seed, top_p) => {
    const r = await client.completions.create({
      model, prompt: 'Once upon a time', max_tokens: 64, temperature: 1.0, top_p, seed,
    });
    return r.choices[0].text;
  };
  for (const seed of seeds) {
    const t = await textOf(seed, 0);
    expect(t === want, `top_p 0, seed ${seed}: the greedy text, got ${JSON.stringify(t)}`);
  }
  let sampled = 0;
  for (const seed of seeds) if ((await textOf(seed, 1)) !== want) sampled++;
  expect(sampled > 0, 'top_p 1 at temperature 1 to sample something else than the greedy text for some seed');
  const chat = async (extra) => {
    const stream = await client.chat.completions.create({
      model, messages: [{ role: 'user', content: 'Tell me a story' }], max_tokens: 40, stream: true, ...extra,
    });
    let text = '';
    for await (const chunk of stream) {
      const d = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (d && d.content) text += d.content;
    }
    return text;
  };
  const greedy = await chat({ temperature: 0 });
  for (const seed of [7, 8]) {
    const t = await chat({ temperature: 1.0, top_p: 0, seed });
    expect(t === greedy,
      `chat at top_p 0, seed ${seed}: the greedy text ${JSON.stringify(greedy)}, got ${JSON.stringify(t)}`);
  }
  return { seeds: seeds.length, sampled_differently_at_top_p_1: sampled };
});

// A prompt longer than the model's context (2,048 tokens for stories260K) is OpenAI's 400
// context_length_exceeded, with `param` naming the prompt or the messages, unary and streamed: the
// SDK raises BadRequestError and a client that trims its history on that code can do so.
await check('context_length_exceeded', async () => {
  const long = 'Once upon a time '.repeat(2000);
  const attempts = [
    ['completions', 'prompt', () => client.completions.create({ model, prompt: long, max_tokens: 3 })],
    ['completions stream', 'prompt', async () => {
      for await (const _ of await client.completions.create({ model, prompt: long, max_tokens: 3, stream: true }));
    }],
    ['chat', 'messages', () => client.chat.completions.create({
      model, messages: [{ role: 'user', content: long }], max_tokens: 3 })],
    ['chat stream', 'messages', async () => {
      for await (const _ of await client.chat.completions.create({
        model, messages: [{ role: 'user', content: long }], max_tokens: 3, stream: true }));
    }],
  ];
  const seen = [];
  for (const [what, param, call] of attempts) {
    let err = null;
    try { await call(); } catch (e) { err = e; }
    expect(err instanceof OpenAI.BadRequestError, `${what}: BadRequestError, got ${err}`);
    expect(err.status === 400 && err.code === 'context_length_exceeded' && err.param === param &&
      err.type === 'invalid_request_error',
      `${what}: 400 context_length_exceeded param ${param}, got ${err.status} ${JSON.stringify(err.error)}`);
    expect(/^This model's maximum context length is 2048 tokens\. However, you requested \d+ tokens/.test(err.error && err.error.message),
      `${what}: OpenAI's message, got ${JSON.stringify(err.error)}`);
    seen.push(what);
  }
  return seen;
});

// prompt + max_tokens over the context, the prompt fitting: the same 400 when the client asked for
// max_tokens (as OpenAI, vLLM and the frontend's own check of token-id prompts answer); without
// max_tokens the completion takes what is left of the context and ends with "length". The prompt's
// size comes from the answers, so the bounds are exact: context - prompt passes, one more is refused.
await check('context_length_max_tokens', async () => {
  const ctx = 2048;
  const prompt = 'Once upon a time '.repeat(500);
  const free = await client.completions.create({ model, prompt, temperature: 0 });
  const p = free.usage.prompt_tokens;
  expect(p > 1900 && p < ctx, `a prompt of a little under ${ctx} tokens, got ${p}`);
  expect(free.choices[0].finish_reason === 'length' && free.usage.completion_tokens === ctx - p,
    `without max_tokens: "length" after ${ctx - p} tokens, got ${free.choices[0].finish_reason} ${JSON.stringify(free.usage)}`);
  const fits = await client.completions.create({ model, prompt, temperature: 0, max_tokens: ctx - p });
  expect(fits.usage.completion_tokens === ctx - p && fits.choices[0].text === free.choices[0].text,
    `max_tokens ${ctx - p} fits exactly, got ${JSON.stringify(fits.usage)}`);
  let err = null;
  try { await client.completions.create({ model, prompt, max_tokens: ctx - p + 1 }); } catch (e) { err = e; }
  expect(err instanceof OpenAI.BadRequestError && err.code === 'context_length_exceeded' && err.param === 'prompt',
    `max_tokens ${ctx - p + 1}: 400 context_length_exceeded, got ${err} ${JSON.stringify(err && err.error)}`);
  expect(err.error.message.includes(`you requested ${ctx + 1} tokens (${p} in the prompt, ${ctx - p + 1} in the completion)`),
    `the counts in the message, got ${JSON.stringify(err.error.message)}`);
  const messages = [{ role: 'user', content: prompt }];
  const chatFree = await client.chat.completions.create({ model, messages, temperature: 0 });
  const pc = chatFree.usage.prompt_tokens;
  expect(chatFree.choices[0].finish_reason === 'length' && chatFree.usage.completion_tokens === ctx - pc,
    `chat without max_tokens: "length" after ${ctx - pc} tokens, got ${JSON.stringify(chatFree.usage)}`);
  err = null;
  try {
    for await (const _ of await client.chat.completions.create({ model, messages, max_tokens: ctx - pc + 1, stream: true }));
  } catch (e) { err = e; }
  expect(err instanceof OpenAI.BadRequestError && err.code === 'context_length_exceeded' && err.param === 'messages',
    `chat stream, max_tokens ${ctx - pc + 1}: 400 context_length_exceeded, got ${err} ${JSON.stringify(err && err.error)}`);
  return { prompt_tokens: p, chat_prompt_tokens: pc };
});

console.log(JSON.stringify({ sdk: sdkVersion, checks }));
