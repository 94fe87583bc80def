// The committed demo model (models/demo-brown, docs/DEMO_MODEL.md) answers a chat request:
// `dsv4 serve` with no --model loads it through the ordinary checkpoint loader, and a greedy
// chat completion comes back as English words (most of them whole words of the model's own
// English BPE vocabulary, with common function words among them), ending by EOS or length.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { startServer } from '../server/openai/helpers.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
const modelDir = path.resolve(here, '../../models/demo-brown');
let srv;

before(async () => { srv = await startServer([], { timeoutMs: 120000 }); });
after(async () => { await srv?.stop(); });

test('no --model serves the trained demo model', () => {
  assert.match(srv.stderr(), /models\/demo-brown/);
});

test('the demo model answers a chat request in English', async () => {
  const res = await fetch(`${srv.url}/chat/completions`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({
      model: 'dsv4-demo',
      messages: [{ role: 'user', content: 'What did the people of the city say about the new school?' }],
      max_tokens: 48,
      temperature: 0,
    }),
  });
  assert.equal(res.status, 200);
  const body = await res.json();
  const text = body.choices[0].message.content;
  assert.ok(['stop', 'length'].includes(body.choices[0].finish_reason));
  const words = (text.toLowerCase().match(/[a-z]+/g) || []);
  assert.ok(words.length >= 5, `too few words: ${JSON.stringify(text)}`);
  const vocab = JSON.parse(fs.readFileSync(path.join(modelDir, 'tokenizer.json'), 'utf8')).model.vocab;
  const known = new Set(Object.keys(vocab).map((t) => t.replace(/^Ġ/, '').toLowerCase()).filter((t) => /^[a-z]{2,}$/.test(t)));
  const inVocab = words.filter((w) => known.has(w) || w === 'a' || w === 'i').length;
  assert.ok(inVocab / words.length >= 0.6, `only ${inVocab}/${words.length} whole English words: ${JSON.stringify(text)}`);
  const common = ['the', 'of', 'and', 'a', 'to', 'in', 'is', 'was', 'he', 'it', 'that', 'for', 'be', 'as', 'with', 'his', 'on'];
  assert.ok(words.some((w) => common.includes(w)), `no common English word: ${JSON.stringify(text)}`);
});
