// Starts `dsv4 serve` on a free loopback port and stops it; shared by the openai-client tests.
import { spawn } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
export const BINARY = process.env.DSV4_BINARY || path.resolve(here, '../../../build/dsv4');

export async function startServer(args = [], { timeoutMs = 60000 } = {}) {
  const proc = spawn(BINARY, ['serve', '--port', '0', '--host', '127.0.0.1', ...args], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stderr = '';
  const exited = new Promise((resolve) => proc.on('exit', (code, signal) => resolve({ code, signal })));
  const port = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`server not ready in ${timeoutMs} ms:\n${stderr}`)), timeoutMs);
    proc.stderr.on('data', (d) => {
      stderr += d.toString();
      const m = stderr.match(/ready at http:\/\/127\.0\.0\.1:(\d+)\/v1/);
      if (m) {
        clearTimeout(timer);
        resolve(Number(m[1]));
      }
    });
    proc.on('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`server exited (${code}) before ready:\n${stderr}`));
    });
  });
  const base = `http://127.0.0.1:${port}`;
  return {
    proc,
    port,
    base,
    url: `${base}/v1`,
    stderr: () => stderr,
    exited,
    async stop(signal = 'SIGTERM', waitMs = 30000) {
      if (proc.exitCode !== null) return exited;
      proc.kill(signal);
      const t = setTimeout(() => proc.kill('SIGKILL'), waitMs);
      const r = await exited;
      clearTimeout(t);
      return r;
    },
  };
}

export async function metric(base, name) {
  const text = await (await fetch(`${base}/metrics`)).text();
  let total = 0;
  let found = false;
  for (const line of text.split('\n')) {
    if (line.startsWith('#')) continue;
    const [key, value] = line.split(' ');
    if (key === name || key.startsWith(name + '{')) {
      total += Number(value);
      found = true;
    }
  }
  return found ? total : undefined;
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// The DSML tool-call block the DeepSeek-V4 format expects after content.
export function dsml(calls) {
  let s = '\n\n<｜DSML｜tool_calls>\n';
  for (const [name, params] of calls) {
    s += `<｜DSML｜invoke name="${name}">\n`;
    for (const [k, v] of Object.entries(params)) {
      const isStr = typeof v === 'string';
      s += `<｜DSML｜parameter name="${k}" string="${isStr}">${isStr ? v : JSON.stringify(v)}</｜DSML｜parameter>\n`;
    }
    s += '</｜DSML｜invoke>\n';
  }
  return s + '</｜DSML｜tool_calls><｜end▁of▁sentence｜>';
}
