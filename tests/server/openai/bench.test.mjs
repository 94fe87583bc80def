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
