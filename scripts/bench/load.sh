#!/usr/bin/env bash
# Capacity of the HTTP layer on this machine (loopback only): starts `dsv4 serve --engine
# scripted` on a free port and runs scripts/bench/load.mjs against it: STREAMS concurrent
# streaming requests (default 4096, in ROUNDS waves) with RSS before / peak / after each wave,
# /health latency throughout (from a separate process; must stay < 100 ms) and a burst of BURST
# (1000) simultaneous connects
# (p99 connect + first byte must be < 1 s). Prints a JSON report; exits 1 when a threshold is missed.
#   scripts/bench/load.sh                       # the figures in docs/SERVER.md
#   STREAMS=512 BURST=200 scripts/bench/load.sh
# Env: DSV4 (binary, default build/dsv4), STREAMS, MAX_TOKENS (per stream, default 40), BURST,
#      RAMP_MS (the streams are opened evenly over this, default 4000), ROUNDS (waves of streams, 2),
#      STEP_MS (scripted engine step, default 250: 4096 streams x 4 tokens/s), SERVE_ARGS.
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=${DSV4:-build/dsv4}
streams=${STREAMS:-4096}
# Client and server each hold a descriptor per connection.
ulimit -n "$(ulimit -Hn)"
[ "$(ulimit -n)" -ge $((streams + ${BURST:-1000} + 256)) ] ||
  { echo "load: ulimit -n is $(ulimit -n); raise the hard limit to at least $((streams + ${BURST:-1000} + 256))" >&2; exit 1; }
log=$(mktemp)
# shellcheck disable=SC2086
$bin serve --engine scripted --port 0 --host 127.0.0.1 --max-running-requests "$((streams < 4096 ? streams : 4096))" \
  --scripted-step-ms "${STEP_MS:-250}" --disable-access-log ${SERVE_ARGS:-} >"$log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; rm -f "$log"' EXIT
port=""
for _ in $(seq 1 600); do
  port=$(grep -o 'ready at http://127.0.0.1:[0-9]*' "$log" | head -1 | sed 's#.*:##') || true
  [ -n "$port" ] && break
  kill -0 $pid 2>/dev/null || { cat "$log"; echo "load: the server exited" >&2; exit 1; }
  sleep 0.2
done
[ -n "$port" ] || { cat "$log"; echo "load: no ready line" >&2; exit 1; }
echo "load: $bin (commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')) pid $pid port $port, $streams streams"
node scripts/bench/load.mjs --port "$port" --pid "$pid" --streams "$streams" --max-tokens "${MAX_TOKENS:-40}" --ramp-ms "${RAMP_MS:-4000}" --rounds "${ROUNDS:-2}" --burst "${BURST:-1000}"
