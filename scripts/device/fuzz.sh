#!/usr/bin/env bash
# Device machine (16 cores, no clang): run the fuzz binaries that `scripts/fuzz.sh pack` built here
# (ASan + UBSan + libFuzzer, into build-fuzz-bin/), each target with one worker per core on one
# shared corpus, until RUNS executions per target. Summary and logs go to $OUT.
#   run: bash scripts/device/fuzz.sh [TARGET...]   (carry: ["build-fuzz-bin"])
# TARGETs default to all four (tokenizer stream_parser request_parser dsml_parser).
# Env: RUNS (per target, default 10000000), WORKERS (default nproc), MAX_TIME (seconds a worker may
#      fuzz, passed as -max_total_time; keeps a call inside the device's 10-minute limit: a target
#      stopped by it reports fewer executions), BIN (default build-fuzz-bin).
# $OUT/fuzz-summary.log: one line per target (executions, time, exec/s, coverage, corpus, findings);
# $OUT/fuzz-logs.tar.gz: every worker's log; $OUT/fuzz-corpus.tar.gz: the grown corpora and any
# finding (crash-*, leak-*, timeout-*, oom-*), to unpack over build-fuzz-bin/ here.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/out}
bin=${BIN:-build-fuzz-bin}
mkdir -p "$OUT"
targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=(tokenizer stream_parser request_parser dsml_parser)
summary=$OUT/fuzz-summary.log
{
  echo "== $(date -u +%FT%TZ) binaries of commit $(cat "$bin/COMMIT" 2>/dev/null || echo unknown), $(nproc) cores"
} | tee -a "$summary"
limit=()
[[ -n ${MAX_TIME:-} ]] && limit=(-max_total_time="$MAX_TIME")
# LeakSanitizer stops threads with ptrace, which a sandboxed kernel may refuse; then every run
# would end in a false finding. Say so and fuzz without leak checks rather than not at all.
probe=$(LD_LIBRARY_PATH=$bin/lib ASAN_OPTIONS=detect_leaks=1 "$bin/fuzz/fuzz_stream_parser" -runs=2 2>&1)
if grep -q "LeakSanitizer has encountered a fatal error" <<<"$probe"; then
  export ASAN_OPTIONS=${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_leaks=0
  echo "LeakSanitizer does not work on this machine: fuzzing with detect_leaks=0" | tee -a "$summary"
fi
rc=0
for t in "${targets[@]}"; do
  bash scripts/fuzz-run.sh "$bin" "$t" "${RUNS:-10000000}" "${WORKERS:-$(nproc)}" "${limit[@]}" 2>&1 |
    grep '^fuzz-run.sh' | tee -a "$summary"
  [[ ${PIPESTATUS[0]} == 0 ]] || rc=1
done
tar -czf "$OUT/fuzz-logs.tar.gz" -C "$bin" fuzz-logs
tar -czf "$OUT/fuzz-corpus.tar.gz" -C "$bin" fuzz-corpus fuzz-artifacts
echo "device fuzz.sh: exit status $rc" | tee -a "$summary"
exit "$rc"
