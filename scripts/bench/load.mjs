// Capacity check of the HTTP layer (loopback only): against a running `dsv4 serve --engine
// scripted`, holds STREAMS concurrent streaming completions, samples the server's RSS, measures
// /health latency from a separate process throughout, then fires a burst of BURST simultaneous
// connects and measures connect + first byte. Started by scripts/bench/load.sh.
//   node scripts/bench/load.mjs --port P --pid PID [--streams 4096] [--max-tokens 40] [--ramp-ms 4000]
//        [--rounds 2] [--burst 1000]
// The streams are opened evenly over --ramp-ms (a burst of connects is measured separately).
// Exit status 1 when a threshold is missed (a stream failed, /health >= 100 ms, burst p99 >= 1 s).
import net from 'node:net';
import { fork } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

const args = Object.fromEntries(process.argv.slice(2).reduce((acc, a, i, all) => {
  if (a.startsWith('--')) acc.push([a.slice(2), all[i + 1]]);
  return acc;
}, []));
const port = Number(args.port);
const host = '127.0.0.1';

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const now = () => Number(process.hrtime.bigint()) / 1e6;
const pct = (xs, p) => {
  if (!xs.length) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))];
};

// One raw HTTP/1.1 exchange on a fresh connection; resolves with timings, the first bytes of the
// response (`head`) and whether `onData` saw its end. Only a short window of the bytes is kept:
// holding thousands of whole streams would make this process's garbage collector compete with
// the server for the CPU.
function exchange(request, { onData } = {}) {
  return new Promise((resolve) => {
    const t0 = now();
    let firstByte = 0;
    let head = '';
    let window = '';
    let ended = false;
    const sock = net.connect({ host, port });
    sock.setNoDelay(true);
    sock.on('connect', () => sock.write(request));
    sock.on('data', (d) => {
      if (!firstByte) firstByte = now() - t0;
      const text = d.toString('latin1');
      if (head.length < 64) head += text.slice(0, 64 - head.length);
      window = (window + text).slice(-4096);
      if (onData && onData(window)) {
        ended = true;
        sock.end();
      }
    });
    sock.on('error', (e) => resolve({ error: String(e), firstByte, head, ended }));
    sock.on('close', () => resolve({ firstByte, total: now() - t0, head, ended }));
  });
}

const get = (path) => `GET ${path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`;

// ---- the /health prober: a separate process, so the streams' work here does not delay it
if (args.probe) {
  const lat = [];
  const start = now();
  let stop = false;
  process.on('message', () => { stop = true; });
  while (!stop) {
    const t = now();
    const r = await exchange(get('/health'));
    lat.push([(t - start) / 1000, r.error || !r.head.startsWith('HTTP/1.1 200') ? 1e9 : r.total]);
    await sleep(50);
  }
  process.send({ lat });
  process.exit(0);
}

const rssKiB = (pid) => Number(/VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))[1]);
const pid = Number(args.pid);
const streams = Number(args.streams ?? 4096);
const maxTokens = Number(args['max-tokens'] ?? 40);
const burst = Number(args.burst ?? 1000);
const rampMs = Number(args['ramp-ms'] ?? 4000);
const rounds = Number(args.rounds ?? 2);

const report = { streams, max_tokens: maxTokens, ramp_ms: rampMs, rounds, burst };
report.rss_before_mib = rssKiB(pid) / 1024;
const tStart = now();
const prober = fork(fileURLToPath(import.meta.url), ['--probe', '1', '--port', String(port)]);
const probed = new Promise((r) => prober.on('message', (m) => r(m.lat)));
let peakRss = 0;
const rssTimer = setInterval(() => { peakRss = Math.max(peakRss, rssKiB(pid)); }, 200);

// ---- STREAMS concurrent streaming requests, ROUNDS times (RSS after each: flat when nothing leaks)
const body = JSON.stringify({ prompt: 'load test', max_tokens: maxTokens, ignore_eos: true, stream: true });
const post = `POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: ${body.length}\r\nConnection: close\r\n\r\n${body}`;
async function streamRound() {
  let open = 0;
  let peakOpen = 0;
  const t0 = now();
  const results = await Promise.all(Array.from({ length: streams }, async (_, i) => {
    await sleep((i * rampMs) / streams);
    let counted = false;
    const r = await exchange(post, {
      onData: (b) => {
        if (!counted && b.includes('data: ')) {
          counted = true;
          peakOpen = Math.max(peakOpen, ++open);
        }
        return b.includes('data: [DONE]');
      },
    });
    if (counted) --open;
    return r;
  }));
  const ok = results.filter((r) => !r.error && r.head.startsWith('HTTP/1.1 200') && r.ended).length;
  const fb = results.map((r) => r.firstByte);
  await sleep(1000);
  return {
    seconds: (now() - t0) / 1000, peak_concurrent: peakOpen, ok, failed: streams - ok,
    first_errors: results.filter((r) => r.error).slice(0, 3).map((r) => r.error),
    first_byte_ms: { p50: pct(fb, 50), p99: pct(fb, 99) }, rss_after_mib: rssKiB(pid) / 1024,
  };
}
report.rounds = [];
for (let i = 0; i < rounds; i++) report.rounds.push(await streamRound());
report.burst_at_s = (now() - tStart) / 1000;
report.rss_peak_mib = peakRss / 1024;

// ---- BURST simultaneous connects: connect + first byte of a /health answer
const burstResults = await Promise.all(Array.from({ length: burst }, () => exchange(get('/health'))));
const fb = burstResults.map((r) => (r.error || !r.firstByte ? 1e9 : r.firstByte));
report.burst_failed = burstResults.filter((r) => r.error || !r.head.startsWith('HTTP/1.1 200')).length;
report.burst_connect_first_byte_ms = { p50: pct(fb, 50), p90: pct(fb, 90), p99: pct(fb, 99), max: Math.max(...fb) };

prober.send('stop');
const probes = await probed;
clearInterval(rssTimer);
const lat = probes.map(([, ms]) => ms);
report.health_probes = lat.length;
report.health_slowest = [...probes].sort((a, b) => b[1] - a[1]).slice(0, 5).map(([t, ms]) => ({ at_s: t, ms }));
report.health_ms = { p50: pct(lat, 50), p99: pct(lat, 99), max: Math.max(...lat) };
await sleep(1000);
report.rss_after_mib = rssKiB(pid) / 1024;
console.log(JSON.stringify(report, (k, v) => (typeof v === 'number' ? Math.round(v * 10) / 10 : v), 2));
const ok = report.rounds.every((r) => r.failed === 0 && r.peak_concurrent >= Math.min(streams, 4096)) &&
  report.health_ms.max < 100 && report.burst_failed === 0 && report.burst_connect_first_byte_ms.p99 < 1000;
console.log(ok ? 'load: PASS' : 'load: FAIL');
process.exit(ok ? 0 : 1);
