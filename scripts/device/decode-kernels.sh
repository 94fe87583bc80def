#!/usr/bin/env bash
# Decode-kernel work (issue #13) in one device call: build, the GPU op tests of the kernels it
# touches (against the CPU twins), the full-width benchmark with its per-op table (our kernels
# next to cuBLASLt, same run), and an Nsight Compute per-kernel profile of one decode step of 4
# layers (the command of /work/shared/measurements/2026-12-01-decode-profile.md).
#   run: GIT_COMMIT=<sha> bash scripts/device/decode-kernels.sh  (carry [".deps"]; the sha written out here:
#   git rev-parse on the device machine can name an older commit than the tree it was sent)
# Env: SKIP_TESTS=1, SKIP_BENCH=1, SKIP_NCU=1, PDL_AB=1 (the bench again with DSV4_CUDA_PDL=0: without programmatic dependent launch), NCU_BATCHES ("1"; e.g. "1 8"), NCU_ARGS (extra bench
# arguments of the profiled run; e.g. "--seqs 64": the last step profiled is then 64 sequences), BENCH_LAYERS (30), BENCH_ARGS
# (extra), GTEST_FILTER, NCU_CTX (1024: the profiled run's --ctx) and NCU_PASS (-1: the forward pass
# summarised, ncu_step_summary.py; NCU_CTX=8192 NCU_PASS=1 profiles a prefill of 8K tokens).
source "$(dirname "$0")/start.sh" decode-kernels
build_gpu dsv4 test_cuda_ops test_cuda_fp8 test_cuda_model
rc=0
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  t0=$(date +%s)
  for b in test_cuda_ops test_cuda_fp8 test_cuda_model; do
    timeout 300 ./build-gpu/tests/cuda/$b --gtest_filter="${GTEST_FILTER:-*}" >"$OUT/$b.log" 2>&1 || { rc=1; echo "FAILED: $b"; grep -E "Failure|FAILED|error" -A4 "$OUT/$b.log" | head -40; }
    grep -E "^\[  PASSED|^\[  FAILED" "$OUT/$b.log"
  done
  echo "== tests: $(( $(date +%s) - t0 )) s, rc=$rc"
fi
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  t0=$(date +%s)
  timeout 300 ./build-gpu/dsv4 bench model --random --layers "${BENCH_LAYERS:-30}" --batch 1,8 --ctx 1024 --steps 5 \
    --gemm fp8 --kv-fp8 ${BENCH_ARGS:-} >"$OUT/bench.log" 2>&1 || rc=1
  cat "$OUT/bench.log"
  if [ "${PDL_AB:-0}" = 1 ]; then  # the same without programmatic dependent launch
    DSV4_CUDA_PDL=0 timeout 300 ./build-gpu/dsv4 bench model --random --layers "${BENCH_LAYERS:-30}" --batch 1,8 --ctx 1024 \
      --steps 5 --gemm fp8 --kv-fp8 --no-ops ${BENCH_ARGS:-} >"$OUT/bench-pdl.log" 2>&1 || rc=1
    echo "== DSV4_CUDA_PDL=0:"; grep -E '^\| (decode|prefill)' "$OUT/bench-pdl.log"
  fi
  echo "== bench: $(( $(date +%s) - t0 )) s"
fi
if [ "${SKIP_NCU:-0}" != 1 ]; then
  for nb in ${NCU_BATCHES:-1}; do  # decode batch sizes to profile, e.g. "1 8"
    t0=$(date +%s)
    csv="$OUT/ncu-b$nb.csv"
    cmd=(./build-gpu/dsv4 bench model --random --layers 4 --batch "$nb" --ctx "${NCU_CTX:-1024}" --steps 1 --gemm fp8 --kv-fp8 --no-ops
         ${NCU_ARGS:-})
    # The random-weight kernels (thousands) are left out of the profile.
    timeout "${NCU_TIMEOUT:-200}" ncu --clock-control none --metrics gpu__time_duration.sum --csv --print-units base \
      --kernel-name-base function --kernel-name "regex:^(?!.*(f32|bf16|bytes|u8|ids)_kernel)" "${cmd[@]}" \
      >"$csv" 2>"$OUT/ncu.err" || echo "ncu rc=$?"
    if ! grep -q embed_kernel "$csv"; then  # the filter matched nothing useful: profile everything
      timeout "${NCU_TIMEOUT:-200}" ncu --clock-control none --metrics gpu__time_duration.sum --csv --print-units base \
        "${cmd[@]}" >"$csv" 2>>"$OUT/ncu.err" || echo "ncu rc=$?"
    fi
    echo "== ncu decode batch $nb"
    python3 scripts/device/ncu_step_summary.py "$csv" "${NCU_PASS:--1}" | tee "$OUT/ncu-step-b$nb.md"
    gzip -f "$csv"
    echo "== ncu: $(( $(date +%s) - t0 )) s"
  done
fi
echo "== rc=$rc"
exit $rc
