// 64 streaming clients at once against the real engine and the tiny demo model: all complete,
// and each output equals the same request run alone (seeded sampling ignores batch mates).
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import OpenAI from 'openai';
import { startServer, metric } from './helpers.mjs';

const N = 64;

function request(i) {
  return {
    model: 'dsv4-demo',
    messages: [{ role: 'user', content: `client ${i}: tell me something about the number ${i * 7}` }],
    max_tokens: 12 + (i % 9),
    temperature: 0.8,
    top_p: 0.95,
    seed: 1000 + i,
    stream: true,
    stream_options: { include_usage: true },
  };
}

async function run(client, i) {
  const stream = await client.chat.completions.create(request(i));
  let text = '';
  let finish = null;
  let usage = null;
  for await (const chunk of stream) {
    if (chunk.usage) usage = chunk.usage;
    for (const c of chunk.choices) {
      if (c.delta.content) text += c.delta.content;
      if (c.finish_reason) finish = c.finish_reason;
    }
  }
  return { text, finish, completion_tokens: usage?.completion_tokens };
}

describe('concurrency', () => {
  let srv;
  let client;
  before(async () => {
    srv = await startServer(['--engine', 'model', '--demo-preset', 'tiny', '--max-running-requests', '64'], { timeoutMs: 120000 });
    client = new OpenAI({ baseURL: srv.url, apiKey: 'x', maxRetries: 0, timeout: 300000 });
  });
  after(async () => { assert.equal((await srv.stop()).code, 0); });

  it(`${N} streaming clients at once equal sequential runs`, async () => {
    const sequential = [];
    for (let i = 0; i < N; i++) sequential.push(await run(client, i));
    const t0 = Date.now();
    const concurrent = await Promise.all(Array.from({ length: N }, (_, i) => run(client, i)));
    const ms = Date.now() - t0;
    for (let i = 0; i < N; i++) {
      assert.ok(concurrent[i].finish, `client ${i} finished`);
      assert.ok(concurrent[i].completion_tokens > 0, `client ${i} usage`);
      assert.deepEqual(concurrent[i], sequential[i], `client ${i}`);
    }
    const distinct = new Set(sequential.map((r) => r.text)).size;
    assert.ok(distinct > N / 2, `outputs differ between clients (${distinct} distinct)`);
    const success = await metric(srv.base, 'dsv4_requests_total{endpoint="chat",outcome="success"}');
    assert.equal(success, 2 * N);
    console.log(`# ${N} concurrent streams in ${ms} ms`);
  });
});
