// The official `openai` npm client against `dsv4 serve` (built-in tiny demo model).
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import OpenAI from 'openai';
import { startServer, metric, sleep, dsml } from './helpers.mjs';

const TOOLS = [
  {
    type: 'function',
    function: {
      name: 'get_weather',
      description: 'Weather for a city',
      parameters: { type: 'object', properties: { city: { type: 'string' }, days: { type: 'integer' } }, required: ['city'] },
    },
  },
  {
    type: 'function',
    function: { name: 'get_time', parameters: { type: 'object', properties: { tz: { type: 'string' } } } },
  },
];

describe('dsv4 serve with the openai client', () => {
  let srv;
  let client;
  let model;
  before(async () => {
    srv = await startServer(['--engine', 'scripted', '--enable-test-hooks', '--max-body-bytes', '200000']);
    client = new OpenAI({ baseURL: srv.url, apiKey: 'unused', maxRetries: 0, timeout: 60000 });
    model = (await client.models.list()).data[0].id;
  });
  after(async () => {
    const r = await srv.stop();
    assert.equal(r.code, 0, `server exit: ${JSON.stringify(r)}\n${srv.stderr()}`);
  });

  it('lists the served model and answers /health', async () => {
    const models = await client.models.list();
    assert.equal(models.data.length, 1);
    assert.equal(models.data[0].id, 'dsv4-demo');
    assert.equal(models.data[0].object, 'model');
    const h = await fetch(`${srv.base}/health`);
    assert.equal(h.status, 200);
  });

  it('chat completion, non-streaming', async () => {
    const r = await client.chat.completions.create({
      model,
      messages: [
        { role: 'system', content: 'You are terse.' },
        { role: 'user', content: 'Say hi' },
      ],
      max_tokens: 12,
      temperature: 0,
      ignore_eos: true,
    });
    assert.equal(r.object, 'chat.completion');
    assert.match(r.id, /^chatcmpl-/);
    assert.equal(r.choices.length, 1);
    assert.equal(r.choices[0].message.role, 'assistant');
    assert.equal(typeof r.choices[0].message.content, 'string');
    assert.ok(r.choices[0].message.content.length > 0);
    assert.equal(r.choices[0].finish_reason, 'length');
    assert.equal(r.usage.completion_tokens, 12);
    assert.ok(r.usage.prompt_tokens > 3);
    assert.equal(r.usage.total_tokens, r.usage.prompt_tokens + 12);
    // Greedy is reproducible.
    const again = await client.chat.completions.create({
      model, messages: [{ role: 'system', content: 'You are terse.' }, { role: 'user', content: 'Say hi' }],
      max_tokens: 12, temperature: 0, ignore_eos: true,
    });
    assert.equal(again.choices[0].message.content, r.choices[0].message.content);
  });

  it('chat completion, streaming with usage chunk and [DONE]', async () => {
    const stream = await client.chat.completions.create({
      model, messages: [{ role: 'user', content: 'Count' }], max_tokens: 16, stream: true,
      stream_options: { include_usage: true }, seed: 7, ignore_eos: true,
    });
    let text = '';
    let finish = null;
    let usage = null;
    let chunks = 0;
    let roleSeen = false;
    for await (const chunk of stream) {
      chunks++;
      assert.equal(chunk.object, 'chat.completion.chunk');
      if (chunk.usage) usage = chunk.usage;
      for (const c of chunk.choices) {
        if (c.delta.role) roleSeen = true;
        if (c.delta.content) text += c.delta.content;
        if (c.finish_reason) finish = c.finish_reason;
      }
    }
    assert.ok(roleSeen);
    assert.ok(chunks >= 4, `chunks ${chunks}`);
    assert.equal(finish, 'length');
    assert.ok(usage, 'usage chunk');
    assert.equal(usage.completion_tokens, 16);
    // Same seed, non-streaming: same text.
    const r = await client.chat.completions.create({
      model, messages: [{ role: 'user', content: 'Count' }], max_tokens: 16, seed: 7, ignore_eos: true,
    });
    assert.equal(r.choices[0].message.content, text);
  });

  it('raw SSE framing ends with data: [DONE]', async () => {
    const res = await fetch(`${srv.url}/chat/completions`, {
      method: 'POST', headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ messages: [{ role: 'user', content: 'x' }], max_tokens: 3, stream: true }),
    });
    assert.equal(res.status, 200);
    assert.match(res.headers.get('content-type'), /text\/event-stream/);
    const body = await res.text();
    const events = body.split('\n\n').filter((e) => e.startsWith('data: '));
    assert.equal(events.at(-1), 'data: [DONE]');
    for (const e of events.slice(0, -1)) JSON.parse(e.slice(6));
  });

  it('n > 1 and logprobs', async () => {
    const r = await client.chat.completions.create({
      model, messages: [{ role: 'user', content: 'two' }], max_tokens: 5, n: 2, logprobs: true, top_logprobs: 3,
      seed: 1, ignore_eos: true,
    });
    assert.equal(r.choices.length, 2);
    assert.deepEqual(r.choices.map((c) => c.index), [0, 1]);
    for (const c of r.choices) {
      assert.equal(c.logprobs.content.length, 5);
      for (const lp of c.logprobs.content) {
        assert.equal(typeof lp.token, 'string');
        assert.ok(lp.logprob <= 0);
        assert.equal(lp.top_logprobs.length, 3);
        assert.ok(Array.isArray(lp.bytes));
      }
      assert.equal(c.logprobs.content.map((x) => x.token).join(''), c.message.content);
    }
    assert.equal(r.usage.completion_tokens, 10);
  });

  it('stop strings cut the output', async () => {
    const base = await client.chat.completions.create({
      model, messages: [{ role: 'user', content: 'stop test' }], max_tokens: 30, temperature: 0, ignore_eos: true,
    });
    const full = base.choices[0].message.content;
    const stop = full.slice(10, 12);
    const cut = full.indexOf(stop);
    const r = await client.chat.completions.create({
      model, messages: [{ role: 'user', content: 'stop test' }], max_tokens: 30, temperature: 0, ignore_eos: true, stop: [stop],
    });
    assert.equal(r.choices[0].message.content, full.slice(0, cut));
    assert.equal(r.choices[0].finish_reason, 'stop');
  });

  it('completions: string prompt, token-id prompt, echo, logprobs, streaming', async () => {
    const r = await client.completions.create({ model, prompt: 'Once upon a time', max_tokens: 8, ignore_eos: true, temperature: 0 });
    assert.equal(r.object, 'text_completion');
    assert.equal(r.choices[0].finish_reason, 'length');
    assert.equal(r.usage.completion_tokens, 8);
    const e = await client.completions.create({
      model, prompt: 'Once upon a time', max_tokens: 8, ignore_eos: true, temperature: 0, echo: true, logprobs: 2,
    });
    assert.ok(e.choices[0].text.startsWith('Once upon a time'));
    assert.equal(e.choices[0].text, 'Once upon a time' + r.choices[0].text);
    const lp = e.choices[0].logprobs;
    assert.equal(lp.tokens.length, lp.token_logprobs.length);
    // The prompt is scored too: only its first token has no logprob.
    assert.equal(lp.token_logprobs[0], null);
    assert.equal(lp.token_logprobs.filter((x) => x !== null).length, lp.tokens.length - 1);
    assert.ok(lp.tokens.length > 8);
    const ids = await client.completions.create({ model, prompt: [5, 6, 7, 8, 9], max_tokens: 4, ignore_eos: true });
    assert.equal(ids.usage.prompt_tokens, 5);
    assert.equal(ids.usage.completion_tokens, 4);
    const stream = await client.completions.create({
      model, prompt: 'Once upon a time', max_tokens: 8, ignore_eos: true, temperature: 0, stream: true,
      stream_options: { include_usage: true },
    });
    let text = '';
    let usage;
    for await (const c of stream) {
      if (c.usage) usage = c.usage;
      for (const ch of c.choices) text += ch.text;
    }
    assert.equal(text, r.choices[0].text);
    assert.equal(usage.completion_tokens, 8);
  });

  it('tool calls (DSML) end to end, non-streaming, parallel', async () => {
    const out = 'Checking both.' + dsml([['get_weather', { city: 'Paris', days: 3 }], ['get_time', { tz: 'Europe/Paris' }]]);
    const r = await client.chat.completions.create({
      model, messages: [{ role: 'user', content: 'Weather and time in Paris?' }], tools: TOOLS, tool_choice: 'auto',
      dsv4_forced_output: out,
    });
    const m = r.choices[0].message;
    assert.equal(r.choices[0].finish_reason, 'tool_calls');
    assert.equal(m.content, 'Checking both.');
    assert.equal(m.tool_calls.length, 2);
    assert.equal(m.tool_calls[0].type, 'function');
    assert.match(m.tool_calls[0].id, /^call_/);
    assert.equal(m.tool_calls[0].function.name, 'get_weather');
    assert.deepEqual(JSON.parse(m.tool_calls[0].function.arguments), { city: 'Paris', days: 3 });
    assert.deepEqual(JSON.parse(m.tool_calls[1].function.arguments), { tz: 'Europe/Paris' });
    // parallel_tool_calls: false keeps the first call only.
    const one = await client.chat.completions.create({
      model, messages: [{ role: 'user', content: 'Weather?' }], tools: TOOLS, parallel_tool_calls: false, dsv4_forced_output: out,
    });
    assert.equal(one.choices[0].message.tool_calls.length, 1);
    // The tool result goes back in the conversation (assistant tool_calls + tool message).
    const follow = await client.chat.completions.create({
      model, tools: TOOLS, tool_choice: 'none', max_tokens: 4,
      messages: [
        { role: 'user', content: 'Weather in Paris?' },
        { role: 'assistant', content: null, tool_calls: [m.tool_calls[0]] },
        { role: 'tool', tool_call_id: m.tool_calls[0].id, content: '{"temp": 21}' },
      ],
    });
    assert.equal(follow.choices.length, 1);
  });

  it('tool calls (DSML) streamed as OpenAI tool_call deltas', async () => {
    const out = dsml([['get_weather', { city: 'Zürich' }]]);
    const stream = await client.chat.completions.create({
      model, messages: [{ role: 'user', content: 'Weather?' }], tools: TOOLS,
      tool_choice: { type: 'function', function: { name: 'get_weather' } }, stream: true, dsv4_forced_output: out,
    });
    const calls = [];
    let finish;
    let content = '';
    for await (const chunk of stream) {
      for (const c of chunk.choices) {
        if (c.delta.content) content += c.delta.content;
        for (const tc of c.delta.tool_calls ?? []) {
          if (!calls[tc.index]) calls[tc.index] = { id: tc.id, name: tc.function?.name, arguments: '' };
          if (tc.function?.arguments) calls[tc.index].arguments += tc.function.arguments;
        }
        if (c.finish_reason) finish = c.finish_reason;
      }
    }
    assert.equal(content, '');
    assert.equal(finish, 'tool_calls');
    assert.equal(calls.length, 1);
    assert.equal(calls[0].name, 'get_weather');
    assert.match(calls[0].id, /^call_/);
    assert.deepEqual(JSON.parse(calls[0].arguments), { city: 'Zürich' });
  });

  it('reasoning_content in message and deltas, all thinking request shapes', async () => {
    const out = 'Let me think: 2+2.</think>It is 4.<｜end▁of▁sentence｜>';
    const shapes = [
      { chat_template_kwargs: { thinking: true } },
      { thinking: { type: 'enabled' } },
      { reasoning_effort: 'max' },
      { chat_template_kwargs: { enable_thinking: true }, reasoning_effort: 'high' },
    ];
    for (const extra of shapes) {
      const r = await client.chat.completions.create({
        model, messages: [{ role: 'user', content: '2+2?' }], dsv4_forced_output: out, ...extra,
      });
      const m = r.choices[0].message;
      assert.equal(m.reasoning_content, 'Let me think: 2+2.', JSON.stringify(extra));
      assert.equal(m.content, 'It is 4.');
      assert.equal(r.choices[0].finish_reason, 'stop');
      // The reasoning's tokens: some, and fewer than all (the answer and </think> are not).
      const rt = r.usage.completion_tokens_details.reasoning_tokens;
      assert.ok(rt > 0 && rt < r.usage.completion_tokens - 1, JSON.stringify(r.usage));
    }
    // Thinking off (default, explicit, reasoning_effort "none"): the same text is all content.
    for (const extra of [{}, { thinking: { type: 'disabled' } }, { chat_template_kwargs: { thinking: false } },
      { reasoning_effort: 'none' }]) {
      const r = await client.chat.completions.create({
        model, messages: [{ role: 'user', content: '2+2?' }], dsv4_forced_output: 'It is 4.<｜end▁of▁sentence｜>', ...extra,
      });
      assert.equal(r.choices[0].message.content, 'It is 4.', JSON.stringify(extra));
      assert.equal(r.choices[0].message.reasoning_content, undefined);
      assert.equal(r.usage.completion_tokens_details.reasoning_tokens, 0);
    }
    const stream = await client.chat.completions.create({
      model, messages: [{ role: 'user', content: '2+2?' }], dsv4_forced_output: out, stream: true, thinking: { type: 'enabled' },
    });
    let reasoning = '';
    let content = '';
    for await (const chunk of stream) {
      for (const c of chunk.choices) {
        if (c.delta.reasoning_content) reasoning += c.delta.reasoning_content;
        if (c.delta.content) content += c.delta.content;
      }
    }
    assert.equal(reasoning, 'Let me think: 2+2.');
    assert.equal(content, 'It is 4.');
  });

  it('response_format json_object / json_schema are accepted and change the prompt', async () => {
    const plain = await client.chat.completions.create({ model, messages: [{ role: 'user', content: 'json' }], max_tokens: 1 });
    const jo = await client.chat.completions.create({
      model, messages: [{ role: 'user', content: 'json' }], max_tokens: 1, response_format: { type: 'json_object' },
    });
    const js = await client.chat.completions.create({
      model, messages: [{ role: 'user', content: 'json' }], max_tokens: 1,
      response_format: { type: 'json_schema', json_schema: { name: 'x', schema: { type: 'object', properties: { a: { type: 'string' } } } } },
    });
    assert.ok(jo.usage.prompt_tokens > plain.usage.prompt_tokens);
    assert.ok(js.usage.prompt_tokens > jo.usage.prompt_tokens);
  });

  it('refuses what it cannot honour, naming the field', async () => {
    const refused = async (body, param, needle) => {
      await assert.rejects(client.chat.completions.create({ model, max_tokens: 1, ...body }), (e) => {
        assert.equal(e.status, 400);
        assert.equal(e.param, param, e.message);
        assert.ok(e.message.includes(needle), e.message);
        return true;
      });
    };
    // Text-only model: an image part is an error, not silently dropped.
    await refused({ messages: [{ role: 'user', content: [{ type: 'text', text: 'what is it?' },
      { type: 'image_url', image_url: { url: 'data:image/png;base64,iVBORw0KGgo=' } }] }] },
    'messages[0].content[1].type', 'text only');
    await refused({ messages: [{ role: 'user', content: 'x' }], stream_options: { include_usage: true } },
      'stream_options', 'stream');
    await refused({ messages: [{ role: 'user', content: 'x' }], reasoning_effort: 'extreme' },
      'reasoning_effort', 'none, minimal, low, medium, high, xhigh, max');
    await refused({ messages: [{ role: 'user', content: 'x' }, { role: 'assistant', content: null,
      tool_calls: [{ id: 'c1', type: 'function', function: { name: 'get_time', arguments: '{}' } }] },
    { role: 'tool', content: '12:00' }] }, 'messages[2].tool_call_id', 'required');
    // Deep nesting (it used to overflow the stack and kill the server).
    const params = '{"p":'.repeat(30000) + '{}' + '}'.repeat(30000);
    const res = await fetch(`${srv.url}/chat/completions`, {
      method: 'POST', headers: { 'content-type': 'application/json' },
      body: `{"messages":[{"role":"user","content":"x"}],"tools":[{"type":"function","function":{"name":"f","parameters":${params}}}]}`,
    });
    assert.equal(res.status, 400);
    assert.match((await res.json()).error.message, /nested deeper than \d+ levels/);
    assert.equal((await fetch(`${srv.base}/health`)).status, 200);
  });

  it('DSML for a tool the request did not offer stays text', async () => {
    const out = dsml([['get_time', { tz: 'UTC' }]]);
    for (const tools of [undefined, [TOOLS[0]]]) {
      const r = await client.chat.completions.create({
        model, messages: [{ role: 'user', content: 'time?' }], tools, dsv4_forced_output: out,
      });
      const m = r.choices[0].message;
      assert.equal(m.tool_calls, undefined, JSON.stringify(m));
      assert.ok(m.content.includes('invoke name="get_time"'), m.content);
      assert.equal(r.choices[0].finish_reason, 'stop');
    }
  });

  it('errors have OpenAI shape and status', async () => {
    const post = (path, body, headers = {}) =>
      fetch(`${srv.url}${path}`, { method: 'POST', headers: { 'content-type': 'application/json', ...headers }, body });
    // Malformed JSON.
    let res = await post('/chat/completions', '{"messages": [');
    assert.equal(res.status, 400);
    let j = await res.json();
    assert.equal(j.error.type, 'invalid_request_error');
    assert.match(j.error.message, /malformed JSON/);
    // Wrong types through the client.
    await assert.rejects(
      client.chat.completions.create({ model, messages: 'hello' }),
      (e) => e instanceof OpenAI.BadRequestError && e.status === 400 && e.error?.param === 'messages',
    );
    await assert.rejects(
      client.chat.completions.create({ model, messages: [{ role: 'user', content: 'x' }], temperature: 'hot' }),
      (e) => e.status === 400 && e.error?.param === 'temperature',
    );
    await assert.rejects(
      client.chat.completions.create({ model, messages: [{ role: 'wizard', content: 'x' }] }),
      (e) => e.status === 400 && /role/.test(e.message),
    );
    // Unknown model.
    await assert.rejects(
      client.chat.completions.create({ model: 'gpt-5', messages: [{ role: 'user', content: 'x' }] }),
      (e) => e instanceof OpenAI.NotFoundError && e.code === 'model_not_found',
    );
    // Context overflow.
    await assert.rejects(
      client.chat.completions.create({ model, messages: [{ role: 'user', content: 'x' }], max_tokens: 1000000 }),
      (e) => e.status === 400 && e.code === 'context_length_exceeded',
    );
    await assert.rejects(
      client.completions.create({ model, prompt: 'word '.repeat(5000), max_tokens: 1 }),
      (e) => e.status === 400 && e.code === 'context_length_exceeded',
    );
    // Oversized body (server started with --max-body-bytes 200000).
    res = await post('/completions', JSON.stringify({ prompt: 'a'.repeat(300000), max_tokens: 1 }));
    assert.equal(res.status, 413);
    j = await res.json();
    assert.match(j.error.message, /exceeds/);
    // Unknown route, wrong method.
    res = await fetch(`${srv.url}/nothing`);
    assert.equal(res.status, 404);
    assert.ok((await res.json()).error);
    // Named tool_choice naming a missing tool; test hook needs its flag (present here) and text.
    await assert.rejects(
      client.chat.completions.create({
        model, messages: [{ role: 'user', content: 'x' }], tools: TOOLS, tool_choice: { type: 'function', function: { name: 'nope' } },
      }),
      (e) => e.status === 400 && e.error?.param === 'tool_choice',
    );
  });

  it('client disconnect aborts the request and frees its state', async () => {
    const before = (await metric(srv.base, 'dsv4_client_disconnects_total')) ?? 0;
    const controller = new AbortController();
    const stream = await client.chat.completions.create(
      { model, messages: [{ role: 'user', content: 'long' }], max_tokens: 3000, ignore_eos: true, stream: true },
      { signal: controller.signal },
    );
    let n = 0;
    try {
      for await (const _ of stream) {
        if (++n === 5) controller.abort();
      }
    } catch (e) {
      // openai may end the iteration quietly or throw an abort error; both are fine.
      assert.ok(e instanceof OpenAI.APIUserAbortError || e.name === 'AbortError', String(e));
    }
    assert.ok(n >= 5 && n < 1000, `chunks after abort: ${n}`);
    // Non-streaming disconnect too (the server probes the connection while it waits).
    const c2 = new AbortController();
    const p = client.chat.completions.create(
      { model, messages: [{ role: 'user', content: 'long2' }], max_tokens: 3000, ignore_eos: true }, { signal: c2.signal },
    );
    setTimeout(() => c2.abort(), 300);
    await assert.rejects(p);
    let after = before;
    for (let i = 0; i < 100 && after < before + 2; i++) {
      await sleep(50);
      after = await metric(srv.base, 'dsv4_client_disconnects_total');
    }
    assert.equal(after, before + 2);
    let running = 1;
    for (let i = 0; i < 100 && running > 0; i++) {
      running = (await metric(srv.base, 'dsv4_num_requests_running')) + (await metric(srv.base, 'dsv4_num_requests_waiting'));
      if (running > 0) await sleep(50);
    }
    assert.equal(running, 0);
    assert.equal(await metric(srv.base, 'dsv4_http_requests_in_flight'), 0);
  });

  it('/metrics is Prometheus text with request, token and latency series', async () => {
    const res = await fetch(`${srv.base}/metrics`);
    assert.equal(res.status, 200);
    assert.match(res.headers.get('content-type'), /text\/plain/);
    const text = await res.text();
    for (const name of [
      'dsv4_requests_total', 'dsv4_prompt_tokens_total', 'dsv4_generation_tokens_total',
      'dsv4_time_to_first_token_seconds_bucket', 'dsv4_time_per_output_token_seconds_count',
      'dsv4_e2e_request_latency_seconds_sum', 'dsv4_num_requests_waiting', 'dsv4_num_requests_running',
      'dsv4_kv_cache_usage_perc', 'dsv4_prefix_cache_hit_rate', 'dsv4_spec_decode_num_draft_tokens_total',
    ]) assert.ok(text.includes(name), name);
    assert.ok((await metric(srv.base, 'dsv4_generation_tokens_total')) > 50);
    assert.ok((await metric(srv.base, 'dsv4_time_to_first_token_seconds_count')) > 5);
    for (const line of text.split('\n')) {
      if (!line || line.startsWith('#')) continue;
      assert.match(line, /^[a-z_0-9]+(\{[^}]*\})? [-+0-9.eInf]+$/, line);
    }
  });
});

describe('auth', () => {
  let srv;
  before(async () => { srv = await startServer(['--engine', 'scripted', '--api-key', 'sekrit']); });
  after(async () => { assert.equal((await srv.stop()).code, 0); });

  it('rejects a missing or wrong key with 401 and accepts the right one', async () => {
    const bad = new OpenAI({ baseURL: srv.url, apiKey: 'wrong', maxRetries: 0 });
    await assert.rejects(bad.models.list(), (e) => e instanceof OpenAI.AuthenticationError && e.status === 401);
    await assert.rejects(
      bad.chat.completions.create({ model: 'dsv4-demo', messages: [{ role: 'user', content: 'x' }] }),
      (e) => e.status === 401 && e.error?.type === 'authentication_error',
    );
    const res = await fetch(`${srv.url}/completions`, { method: 'POST', body: '{"prompt":"x"}' });
    assert.equal(res.status, 401);
    const good = new OpenAI({ baseURL: srv.url, apiKey: 'sekrit', maxRetries: 0 });
    const r = await good.chat.completions.create({ model: 'dsv4-demo', messages: [{ role: 'user', content: 'x' }], max_tokens: 2 });
    assert.equal(r.choices.length, 1);
    // Health and metrics stay open for probes.
    assert.equal((await fetch(`${srv.base}/health`)).status, 200);
    assert.equal((await fetch(`${srv.base}/metrics`)).status, 200);
  });
});

describe('graceful shutdown', () => {
  it('SIGTERM finishes the in-flight stream, refuses new work, exits 0', async () => {
    const srv = await startServer(['--engine', 'scripted', '--scripted-step-ms', '5']);
    const client = new OpenAI({ baseURL: srv.url, apiKey: 'x', maxRetries: 0 });
    const stream = await client.chat.completions.create({
      model: 'dsv4-demo', messages: [{ role: 'user', content: 'go' }], max_tokens: 200, ignore_eos: true, stream: true,
      stream_options: { include_usage: true },
    });
    let usage;
    let n = 0;
    for await (const chunk of stream) {
      if (++n === 3) {
        srv.proc.kill('SIGTERM');
        await sleep(100);
        await assert.rejects(
          client.chat.completions.create({ model: 'dsv4-demo', messages: [{ role: 'user', content: 'late' }], max_tokens: 2 }),
          (e) => e.status === 503 || e instanceof OpenAI.APIConnectionError,
        );
      }
      if (chunk.usage) usage = chunk.usage;
    }
    assert.equal(usage.completion_tokens, 200);
    const r = await srv.exited;
    assert.equal(r.code, 0, srv.stderr());
    assert.match(srv.stderr(), /SIGTERM received/);
  });
});
