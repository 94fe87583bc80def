// The openai client against `dsv4 serve` on the real engine and the built-in tiny model (CPU):
// every path once, with short outputs (the CPU reference is slow).
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import OpenAI from 'openai';
import { startServer, metric, dsml } from './helpers.mjs';

describe('real engine + tiny demo model', () => {
  let srv;
  let client;
  before(async () => {
    srv = await startServer(['--engine', 'model', '--demo-preset', 'tiny', '--enable-test-hooks'], { timeoutMs: 120000 });
    client = new OpenAI({ baseURL: srv.url, apiKey: 'x', maxRetries: 0, timeout: 300000 });
  });
  after(async () => {
    const r = await srv.stop();
    assert.equal(r.code, 0, srv.stderr());
  });

  it('chat (non-streaming and streaming) and completions generate tokens', async () => {
    const r = await client.chat.completions.create({
      model: 'dsv4-demo', messages: [{ role: 'user', content: 'hi' }], max_tokens: 4, temperature: 0, ignore_eos: true,
    });
    assert.equal(r.usage.completion_tokens, 4);
    assert.equal(r.choices[0].finish_reason, 'length');
    const stream = await client.chat.completions.create({
      model: 'dsv4-demo', messages: [{ role: 'user', content: 'hi' }], max_tokens: 4, temperature: 0, ignore_eos: true,
      stream: true, stream_options: { include_usage: true },
    });
    let text = '';
    let usage;
    for await (const c of stream) {
      if (c.usage) usage = c.usage;
      for (const ch of c.choices) text += ch.delta.content ?? '';
    }
    assert.equal(usage.completion_tokens, 4);
    assert.equal(text, r.choices[0].message.content, 'greedy streaming == non-streaming');
    const c = await client.completions.create({ model: 'dsv4-demo', prompt: [5, 6, 7], max_tokens: 3, ignore_eos: true, logprobs: 2 });
    assert.equal(c.usage.completion_tokens, 3);
    assert.equal(c.choices[0].logprobs.token_logprobs.length, 3);
    for (const lp of c.choices[0].logprobs.token_logprobs) assert.ok(lp <= 0);
  });

  it('echo + logprobs scores the prompt: the greedy token\'s logprob is the best alternative of the scored row', async () => {
    const prompt = [5, 6, 7, 8];
    const g = await client.completions.create({ model: 'dsv4-demo', prompt, max_tokens: 1, temperature: 0, ignore_eos: true, logprobs: 1 });
    const greedyLogprob = g.choices[0].logprobs.token_logprobs[0];
    // Score prompt + any next token: the row that scores position 4 is the row greedy decoding drew from.
    const s = await client.completions.create({ model: 'dsv4-demo', prompt: [...prompt, 9], max_tokens: 0, echo: true, logprobs: 3 });
    const lp = s.choices[0].logprobs;
    assert.equal(s.usage.completion_tokens, 0);
    assert.equal(lp.token_logprobs.length, prompt.length + 1);
    assert.equal(lp.token_logprobs[0], null);
    assert.equal(lp.top_logprobs[0], null);
    for (const v of lp.token_logprobs.slice(1)) assert.ok(v <= 0);
    const best = Math.max(...Object.values(lp.top_logprobs[prompt.length]));
    assert.ok(Math.abs(best - greedyLogprob) < 1e-5, `${best} vs ${greedyLogprob}`);
    assert.ok(lp.token_logprobs[prompt.length] <= best);
    assert.equal(lp.text_offset.length, prompt.length + 1);
    await assert.rejects(client.completions.create({ model: 'dsv4-demo', prompt, max_tokens: 0 }), /max_tokens/);
  });

  it('tool call and reasoning through the engine schedule (forced output)', async () => {
    const r = await client.chat.completions.create({
      model: 'dsv4-demo', messages: [{ role: 'user', content: 'f?' }],
      tools: [{ type: 'function', function: { name: 'f', parameters: { type: 'object' } } }],
      dsv4_forced_output: dsml([['f', { a: 1 }]]),
    });
    assert.equal(r.choices[0].finish_reason, 'tool_calls');
    assert.equal(r.choices[0].message.tool_calls[0].function.name, 'f');
    assert.deepEqual(JSON.parse(r.choices[0].message.tool_calls[0].function.arguments), { a: 1 });
    const t = await client.chat.completions.create({
      model: 'dsv4-demo', messages: [{ role: 'user', content: 'q' }], thinking: { type: 'enabled' },
      dsv4_forced_output: 'hm</think>ok<｜end▁of▁sentence｜>',
    });
    assert.equal(t.choices[0].message.reasoning_content, 'hm');
    assert.equal(t.choices[0].message.content, 'ok');
  });

  it('concurrent seeded requests equal sequential runs', async () => {
    const req = (i) => ({
      model: 'dsv4-demo', messages: [{ role: 'user', content: `n${i}` }], max_tokens: 3, temperature: 1, seed: i, ignore_eos: true,
    });
    const seq = [];
    for (let i = 0; i < 4; i++) seq.push((await client.chat.completions.create(req(i))).choices[0].message.content);
    const par = await Promise.all([0, 1, 2, 3].map(async (i) => (await client.chat.completions.create(req(i))).choices[0].message.content));
    assert.deepEqual(par, seq);
    assert.ok((await metric(srv.base, 'dsv4_engine_generation_tokens_total')) > 20);
  });
});
