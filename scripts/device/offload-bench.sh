#!/usr/bin/env bash
# Issue #17 in one device call: build, the host-resident expert test (bit-identical logits), then
# the full model (43 layers + MTP, random weights at official precision) on one H200 with routed
# experts in pinned host memory (--offload-experts auto): decode of 1 and 16 sequences, prefill.
#   run: GIT_COMMIT=$(git rev-parse --short HEAD) bash scripts/device/offload-bench.sh  (carry [".deps"])
# Env: OFFLOAD ("auto"), RESERVE ("12G"), BENCH_ARGS (extra), SKIP_TESTS=1.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/offload-bench.log") 2>&1
echo "== $(date -u +%FT%TZ) commit ${GIT_COMMIT:-unknown}"
eval "$(bash scripts/device/setup-deps.sh)" || exit 1
t0=$(date +%s)
cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DDSV4_CUDA_ARCHS=90a >"$OUT/configure.log" 2>&1 \
  || { tail -40 "$OUT/configure.log"; exit 1; }
cmake --build build-gpu -j"${JOBS:-16}" --target dsv4 test_cuda_model 2>&1 | tail -3
[ "${PIPESTATUS[0]}" = 0 ] || { echo "BUILD FAILED"; exit 1; }
echo "== build: $(( $(date +%s) - t0 )) s"
rc=0
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  ./build-gpu/tests/cuda/test_cuda_model --gtest_filter='*HostResident*' 2>&1 | grep -E '^\[model\]|OK|FAILED|Failure' || rc=1
fi
timeout 420 ./build-gpu/dsv4 bench model --random --layers 43 --batch 1 --seqs 16 --ctx 1024,8192 --steps 5 \
  --gemm fp8 --kv-fp8 --no-ops --offload-experts "${OFFLOAD:-auto}" --offload-reserve "${RESERVE:-12G}" ${BENCH_ARGS:-} \
  >"$OUT/bench.log" 2>&1 || rc=1
cat "$OUT/bench.log"
echo "== rc=$rc"
exit $rc
