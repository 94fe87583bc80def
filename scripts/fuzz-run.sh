#!/usr/bin/env bash
# Run one already-built libFuzzer target with W workers on one shared corpus until RUNS executions
# in all, then count what ran. Used by scripts/fuzz.sh (here) and scripts/device/fuzz.sh (prebuilt
# binaries on the 16-core device machine).
#
#   scripts/fuzz-run.sh DIR TARGET RUNS WORKERS [extra libFuzzer flags...]
#
# DIR holds fuzz/fuzz_TARGET, fuzz-seeds/TARGET (written by scripts/fuzz.sh) and, optionally,
# lib/ (shared libraries the binary needs, put on LD_LIBRARY_PATH) and tokenizer.json (the
# DeepSeek tokenizer for the tokenizer target, unless DSV4_FUZZ_TOKENIZER names one). The corpus
# grows in DIR/fuzz-corpus/TARGET, findings (crash-*, leak-*, timeout-*, oom-*) land in
# DIR/fuzz-artifacts/TARGET/, logs in DIR/fuzz-logs/TARGET/ (fuzz-N.log per worker job).
#
# With WORKERS > 1 it uses libFuzzer's -jobs=W -workers=W: W processes fuzz at once, each
# -runs=ceil(RUNS/W), all adding to and re-reading the same corpus directory. Extra flags come
# last, so e.g. -max_len=1024 overrides the target's default; -max_total_time=S bounds each
# worker's time (then fewer than RUNS may run: the summary line says how many did).
# Prints one summary line per target (executions, seconds, exec/s, coverage, corpus, findings)
# and exits non-zero when any worker reported a finding or did not finish.
set -euo pipefail
[[ $# -ge 4 ]] || { echo "usage: $0 DIR TARGET RUNS WORKERS [libFuzzer flags...]" >&2; exit 2; }
dir=$(cd "$1" && pwd) target=$2 runs=$3 workers=$4
shift 4
repo=$(cd "$(dirname "$0")/.." && pwd)
bin=$dir/fuzz/fuzz_$target
[[ -x $bin ]] || { echo "fuzz-run.sh: $bin not built" >&2; exit 2; }
[[ -d $dir/fuzz-seeds/$target ]] || { echo "fuzz-run.sh: no seeds in $dir/fuzz-seeds/$target" >&2; exit 2; }
[[ -d $dir/lib ]] && export LD_LIBRARY_PATH=$dir/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}

# Per-target input size limit and dictionary.
flags=(-max_len=4096)
case $target in
  tokenizer)
    if [[ -z ${DSV4_FUZZ_TOKENIZER:-} && -f $dir/tokenizer.json ]]; then
      export DSV4_FUZZ_TOKENIZER=$dir/tokenizer.json
    fi
    [[ -n ${DSV4_FUZZ_TOKENIZER:-} ]] || echo "fuzz-run.sh: no DeepSeek tokenizer.json; fuzzing the tiny tokenizer only" >&2
    ;;
  request_parser) flags=(-max_len=8192 -dict="$repo/fuzz/request_parser.dict") ;;
  dsml_parser) flags=(-dict="$repo/fuzz/dsml.dict") ;;
esac

corpus=$dir/fuzz-corpus/$target artifacts=$dir/fuzz-artifacts/$target logs=$dir/fuzz-logs/$target
mkdir -p "$corpus" "$artifacts" "$logs"
rm -f "$logs"/fuzz-*.log
per_worker=$(((runs + workers - 1) / workers))
parallel=()
((workers > 1)) && parallel=(-jobs="$workers" -workers="$workers")
echo "fuzz-run.sh: fuzz_$target, $workers worker(s) x $per_worker runs; logs in $logs"
start=$(date +%s)
set +e
# libFuzzer writes each job's log to fuzz-N.log in the working directory; one worker logs here too.
(cd "$logs" && "$bin" -runs="$per_worker" "${flags[@]}" -timeout=30 -rss_limit_mb=4096 -print_final_stats=1 \
  -artifact_prefix="$artifacts/" "${parallel[@]}" "$@" "$corpus" "$dir/fuzz-seeds/$target" \
  >"$logs/driver.log" 2>&1)
rc=$?
set -e
seconds=$(($(date +%s) - start))
((workers > 1)) || cp "$logs/driver.log" "$logs/fuzz-0.log"

# Every worker's final stats: executions, and the best coverage any worker reached.
python3 - "$target" "$logs" "$corpus" "$artifacts" "$seconds" "$workers" "$rc" <<'PY'
import glob, os, re, sys
target, logs, corpus, artifacts, seconds, workers, rc = sys.argv[1:]
seconds, workers, rc = int(seconds), int(workers), int(rc)
execs = cov = ft = finished = 0
findings = []
for log in sorted(glob.glob(os.path.join(logs, "fuzz-*.log"))):
    text = open(log, errors="replace").read()
    m = re.findall(r"stat::number_of_executed_units: (\d+)", text)
    if m:
        execs += int(m[-1])
        finished += 1
    for c, f in re.findall(r" cov: (\d+) ft: (\d+)", text):
        cov, ft = max(cov, int(c)), max(ft, int(f))
    if re.search(r"ERROR: (libFuzzer|AddressSanitizer|LeakSanitizer|UndefinedBehaviorSanitizer)|"
                 r"runtime error:|invariant failed|SUMMARY: ", text):
        findings.append(os.path.basename(log))
units = [os.path.join(corpus, f) for f in os.listdir(corpus)]
size = sum(os.path.getsize(u) for u in units)
found = sorted(f for f in os.listdir(artifacts) if f.split("-")[0] in ("crash", "leak", "timeout", "oom"))
print(f"fuzz-run.sh: {target}: {execs:,} executions in {seconds} s ({execs / max(seconds, 1):,.0f} exec/s) "
      f"by {finished}/{workers} workers; coverage {cov} edges / {ft} features; corpus {len(units)} units / "
      f"{size / 1024:.0f} KB; findings: {len(findings)} log(s) {findings}, artifacts {found}; libFuzzer status {rc}")
sys.exit(1 if rc or findings or finished < workers else 0)
PY
