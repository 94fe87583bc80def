#!/usr/bin/env bash
# One device call: build the CUDA code for sm_90a, run the gpu ctest label (op tests, whole-model
# CUDA vs CPU, golden fixtures on CUDA), `dsv4 logits --backend cuda` on a fixture, and the
# full-width random-model benchmark. Logs go to $OUT (gpu-tests.log, bench.log).
#   run: bash scripts/device/gpu-tests.sh   (carry: [".deps"])
# Env: BENCH_LAYERS (default 30), BENCH_ARGS (extra), SKIP_BENCH=1, SKIP_TESTS=1, JOBS (16),
#      SERVE_SWEEP=1 (serving throughput at concurrency SWEEP, default 1,32, of the `small` preset on
#      CUDA: scripts/bench/serve-sweep.sh; log serve-sweep.log),
#      CTEST_ARGS (extra ctest arguments, e.g. '-R fp8' for a subset).
source "$(dirname "$0")/start.sh" gpu-tests
build_gpu dsv4 test_cuda_ops test_cuda_model test_cuda_golden test_cuda_engine test_cuda_fp8 test_nccl
rc=0
if [ -n "${SANITIZE:-}" ]; then  # e.g. SANITIZE='CudaOps.Route' : memcheck + racecheck, first reports only
  g=tests/data/golden/tiny
  timeout 120 compute-sanitizer --tool memcheck --print-limit 3 ./build-gpu/dsv4 logits --model $g --tokens 1,2,3,4,5,6,7,8,9 \
    --backend cuda --out /tmp/s.npy 2>&1 | head -60
  for tool in memcheck racecheck; do
    timeout 150 compute-sanitizer --tool $tool --print-limit 3 ./build-gpu/tests/cuda/test_cuda_ops --gtest_filter="$SANITIZE" \
      2>&1 | grep -v '^\[maxerr\]' | head -60
  done
fi
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  t0=$(date +%s)
  (cd build-gpu && ctest -L gpu --output-on-failure --timeout 900 -j1 ${CTEST_ARGS:-}) || rc=1
  echo "== ctest -L gpu: $(( $(date +%s) - t0 )) s, rc=$rc"
  for b in test_cuda_ops test_cuda_model test_cuda_fp8; do ./build-gpu/tests/cuda/$b 2>&1 | grep -E '^\[maxerr\]|^\[model\]|^\[diag\]' ; done \
    > "$OUT/maxerr.log" || true
  # CLI: logits on CUDA (exact and fp8 KV) for one fixture.
  g=tests/data/golden/tiny
  toks=$(python3 -c "import json;print(','.join(map(str,json.load(open('$g/cases.json'))['cases'][1]['tokens'] if isinstance(json.load(open('$g/cases.json')),dict) else json.load(open('$g/cases.json'))[1]['tokens'])))")
  ./build-gpu/dsv4 logits --model $g --tokens "$toks" --backend cuda --out /tmp/l_cuda.npy && \
  ./build-gpu/dsv4 logits --model $g --tokens "$toks" --backend cuda --kv fp8 --out /tmp/l_cuda_fp8.npy && \
  python3 - <<'PY' || rc=1
import numpy as np
a = np.load('/tmp/l_cuda.npy'); r = np.load('tests/data/golden/tiny/len40.logits.npy'); f = np.load('/tmp/l_cuda_fp8.npy')
e = np.abs(a - r).max() / np.abs(r).max()
print(f"dsv4 logits --backend cuda tiny/len40: rel err vs transformers {e:.3e}, argmax agree {np.mean(a.argmax(1)==r.argmax(1)):.3f}")
print(f"  --kv fp8: rel diff vs exact {np.abs(f-a).max()/np.abs(a).max():.3e}, argmax agree {np.mean(f.argmax(1)==a.argmax(1)):.3f}")
assert e <= 1e-4
PY
  # FP8 activations (--gemm fp8) on tiny-fp8: CPU simulation, CUDA (auto: cuBLASLt on sm_90), vs exact.
  g=tests/data/golden/tiny-fp8
  toks=$(python3 -c "import json;print(','.join(map(str,json.load(open('$g/cases.json'))['cases'][1]['tokens'])))")
  ./build-gpu/dsv4 logits --model $g --tokens "$toks" --gemm fp8 --out /tmp/f8_cpu.npy && \
  ./build-gpu/dsv4 logits --model $g --tokens "$toks" --gemm fp8 --backend cuda --out /tmp/f8_cuda.npy && \
  python3 - <<'PY' || rc=1
import numpy as np
r = np.load('tests/data/golden/tiny-fp8/len40.logits.npy'); c = np.load('/tmp/f8_cpu.npy'); g = np.load('/tmp/f8_cuda.npy')
def d(a, b):
    row = np.abs(a - b).max(1) / np.abs(b).max(1)
    return f"max rel {row.max():.3e}, median row rel {np.median(row):.3e}, argmax agree {np.mean(a.argmax(1) == b.argmax(1)):.3f}"
print("--gemm fp8 tiny-fp8/len40: CPU simulation vs transformers (FP32):", d(c, r))
print("                           CUDA (auto path) vs transformers:      ", d(g, r))
print("                           CUDA vs CPU simulation:                ", d(g, c))
PY
fi
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  ./build-gpu/dsv4 bench model --random --layers "${BENCH_LAYERS:-30}" --batch 1,8,64 --ctx 1024,8192 ${BENCH_ARGS:-} \
    2>&1 | tee "$OUT/bench.log"
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
fi
if [ "${SERVE_SWEEP:-0}" = 1 ]; then
  ./build-gpu/dsv4 make-tiny --preset small --out /tmp/dsv4-small >/dev/null && \
  DSV4=build-gpu/dsv4 SWEEP=${SWEEP:-1,32} SERVE_ARGS="--model /tmp/dsv4-small --backend cuda" \
    BENCH_ARGS="--input-len 128 --output-len 64 --num-prompts 64" OUT_JSON="$OUT/serve-sweep.json" \
    bash scripts/bench/serve-sweep.sh 2>&1 | tee "$OUT/serve-sweep.log"
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
fi
echo "== done rc=$rc"
exit $rc
