// `dsv4 bench serve` sweep against `dsv4 serve` (the default demo server): JSON, CSV and SVG.
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { startServer, BINARY, metric } from './helpers.mjs';

describe('dsv4 bench serve', () => {
  let srv;
  before(async () => { srv = await startServer(['--demo-preset', 'tiny'], { timeoutMs: 120000 }); });
  after(async () => { assert.equal((await srv.stop()).code, 0); });

  it('concurrency sweep writes JSON, CSV and an SVG plot', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'dsv4-bench-'));
    const out = (f) => path.join(dir, f);
    const r = spawnSync(BINARY, ['bench', 'serve', '--base-url', srv.base, '--num-prompts', '4', '--input-len', '8',
      '--output-len', '4', '--concurrency-sweep', '1,2,4', '--warmup', '1', '--result-json', out('r.json'),
      '--result-csv', out('r.csv'), '--plot', out('r.svg'), '--quiet'], { encoding: 'utf8', timeout: 300000 });
    assert.equal(r.status, 0, r.stdout + r.stderr);
    assert.match(r.stdout, /Serving Benchmark Result/);
    const j = JSON.parse(fs.readFileSync(out('r.json'), 'utf8'));
    assert.equal(j.results.length, 3);
    assert.deepEqual(j.results.map((p) => p.max_concurrency), [1, 2, 4]);
    for (const p of j.results) {
      assert.equal(p.completed, 4);
      assert.equal(p.failed, 0);
      assert.equal(p.total_output_tokens, 16);
      assert.ok(p.output_throughput > 0);
      for (const k of ['ttft_ms', 'tpot_ms', 'itl_ms', 'e2el_ms'])
        for (const s of ['mean', 'median', 'p90', 'p99']) assert.ok(Number.isFinite(p[k][s]) && p[k][s] >= 0, `${k}.${s}`);
      assert.ok(p.e2el_ms.median >= p.ttft_ms.median);
      assert.ok(p.peak_concurrency <= p.max_concurrency);
      assert.equal(p.spec_decode, undefined, 'no speculative decoding on this server');
    }
    const csv = fs.readFileSync(out('r.csv'), 'utf8').trim().split('\n');
    assert.equal(csv.length, 4);
    assert.equal(csv[0].split(',').length, csv[1].split(',').length);
    const svg = fs.readFileSync(out('r.svg'), 'utf8');
    assert.match(svg, /^<svg /);
    assert.equal((svg.match(/<polyline /g) || []).length, 7);
    // 3 points x (4 + 1 warm-up) requests reached the server.
    assert.equal(await metric(srv.base, 'dsv4_requests_total{endpoint="completions",outcome="success"}'), 15);
  });

  it('reports failures (unknown model) with a non-zero exit', () => {
    const r = spawnSync(BINARY, ['bench', 'serve', '--base-url', srv.url, '--model', 'nope', '--num-prompts', '2',
      '--output-len', '2', '--quiet'], { encoding: 'utf8', timeout: 60000 });
    assert.equal(r.status, 3, r.stdout + r.stderr);
    assert.match(r.stdout, /Failed requests:\s+2/);
    assert.match(r.stdout, /HTTP 404/);
  });
});

describe('dsv4 bench serve against a speculative server', () => {
  let srv;
  before(async () => {
    srv = await startServer(['--demo-preset', 'tiny', '--speculative-tokens', '2'], { timeoutMs: 120000 });
  });
  after(async () => { assert.equal((await srv.stop()).code, 0); });

  it('reports the drafts and mean acceptance length of the run (the /metrics counters before and after it)', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'dsv4-bench-spec-'));
    const json = path.join(dir, 'r.json');
    const r = spawnSync(BINARY, ['bench', 'serve', '--base-url', srv.base, '--num-prompts', '6', '--input-len', '8',
      '--output-len', '24', '--max-concurrency', '3', '--warmup', '1', '--result-json', json, '--quiet'],
    { encoding: 'utf8', timeout: 300000 });
    assert.equal(r.status, 0, r.stdout + r.stderr);
    const [p] = JSON.parse(fs.readFileSync(json, 'utf8')).results;
    const drafts = await metric(srv.base, 'dsv4_spec_decode_num_draft_tokens_total');
    const accepted = await metric(srv.base, 'dsv4_spec_decode_num_accepted_tokens_total');
    const passes = await metric(srv.base, 'dsv4_spec_decode_num_verify_steps_total');
    const sd = p.spec_decode;
    assert.ok(sd, 'spec_decode in the result');
    // The warm-up request drafted too, before the counters were first read: the run's share is less.
    assert.ok(sd.draft_tokens > 0 && sd.draft_tokens < drafts, `${sd.draft_tokens} of ${drafts}`);
    assert.ok(sd.verify_passes > 0 && sd.verify_passes < passes);
    assert.ok(sd.accepted_tokens >= 0 && sd.accepted_tokens <= accepted && sd.accepted_tokens <= sd.draft_tokens);
    assert.ok(sd.draft_tokens <= 2 * sd.verify_passes);
    assert.equal(sd.acceptance_rate, sd.accepted_tokens / sd.draft_tokens);
    assert.equal(sd.mean_acceptance_length, (sd.accepted_tokens + sd.verify_passes) / sd.verify_passes);
    assert.match(r.stdout, /Speculative Decoding/);
    assert.match(r.stdout, new RegExp(`Mean acceptance length:\\s+${sd.mean_acceptance_length.toFixed(3)}`));
    assert.match(r.stdout, new RegExp(`Draft tokens:\\s+${sd.draft_tokens}\\b`));
  });
});
