#!/usr/bin/env bash
# Serving throughput against concurrency, on this machine only (loopback): starts `dsv4 serve` with
# SERVE_ARGS on a free port, runs `dsv4 bench serve --concurrency-sweep SWEEP` against it, prints
# every point's output throughput and its ratio to the first point, and stops the server.
#   DSV4=build/dsv4 SWEEP=1,8 SERVE_ARGS="--demo-preset small" scripts/bench/serve-sweep.sh
# Env: DSV4 (binary), SWEEP (default 1,8), SERVE_ARGS, BENCH_ARGS (default: --input-len 128
#      --output-len 64 --num-prompts 32), OUT_JSON (where the bench writes its JSON).
# Exits non-zero when MIN_RATIO is set and last-point / first-point throughput is below it.
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=${DSV4:-build/dsv4}
sweep=${SWEEP:-1,8}
json=${OUT_JSON:-$(mktemp --suffix=.json)}
log=$(mktemp)
# shellcheck disable=SC2086
$bin serve --port 0 ${SERVE_ARGS:-} >"$log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true' EXIT
url=""
for _ in $(seq 1 600); do
  url=$(grep -o 'ready at http://[^ ]*' "$log" | head -1 | sed 's#ready at ##; s#/v1$##') || true
  [ -n "$url" ] && break
  kill -0 $pid 2>/dev/null || { cat "$log"; echo "serve-sweep: the server exited"; exit 1; }
  sleep 0.5
done
[ -n "$url" ] || { cat "$log"; echo "serve-sweep: no ready line"; exit 1; }
echo "serve-sweep: server at $url ($SERVE_ARGS)"
# shellcheck disable=SC2086
$bin bench serve --base-url "$url" --endpoint /v1/completions --concurrency-sweep "$sweep" --quiet \
  ${BENCH_ARGS:---input-len 128 --output-len 64 --num-prompts 32} --result-json "$json" >/dev/null
python3 - "$json" "${MIN_RATIO:-0}" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
pts = d["results"]
base = pts[0]["output_throughput"]
for p in pts:
    print(f"concurrency {p['max_concurrency']:>4}: output {p['output_throughput']:8.1f} tok/s "
          f"({p['output_throughput'] / base:5.2f}x concurrency {pts[0]['max_concurrency']}), "
          f"median TPOT {p['tpot_ms']['median']:.2f} ms, failed {p['failed']}")
ratio = pts[-1]["output_throughput"] / base
if ratio < float(sys.argv[2]):
    sys.exit(f"serve-sweep: ratio {ratio:.2f} below {sys.argv[2]}")
PY
