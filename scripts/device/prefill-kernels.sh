#!/usr/bin/env bash
# Prefill-kernel work (issue #14) in one device call: build, the GPU op tests of the prefill kernels
# against their CPU twins (GTEST_FILTER), the per-op table of a 4-layer 8K prefill (our GEMMs next
# to cuBLASLt, same run), the 30-layer prefill, and Nsight Compute stall sections of one kernel
# launched by an op-test binary (ncu fails with rc 9 on the bench process, but works there).
#   run: GIT_COMMIT=<sha> bash scripts/device/prefill-kernels.sh  (carry [".deps"]; the sha written out here:
#   git rev-parse on the device machine can name an older commit than the tree it was sent)
# Env: GTEST_FILTER ('*LinearAllPaths*:*MoE*:*ActQuant*:*IndexTopk*:*Attend*'), SKIP_TESTS=1,
#      SKIP_OPS=1, SKIP_BENCH=1, BENCH_CTX (8192; e.g. 8192,131072), BENCH_LAYERS (30),
#      NCU_KERNEL (a kernel name regex, e.g. wgmma_fp4; unset: no ncu), NCU_TEST (test_cuda_fp8),
#      NCU_FILTER (its gtest filter, '*LinearAllPaths*'), NCU_SKIP (launches skipped first, 2;
#      'largest': the launch with the largest grid among the first 16),
#      NCU_SASS=1 (also the full set with source: stalls per SASS region, ncu_sass_regions.py),
#      AB_ENV (environment assignments, e.g. 'DSV4_CUDA_HC_MMA=0': the op table and the
#      30-layer prefill run again under them, logs ops-ab.log and bench-ab.log).
source "$(dirname "$0")/start.sh" prefill-kernels
build_gpu dsv4 test_cuda_ops test_cuda_fp8
rc=0
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  for b in test_cuda_fp8 test_cuda_ops; do
    timeout 300 ./build-gpu/tests/cuda/$b --gtest_filter="${GTEST_FILTER:-*LinearAllPaths*:*MoE*:*ActQuant*:*IndexTopk*:*Attend*}" \
      >"$OUT/$b.log" 2>&1 || { rc=1; echo "FAILED: $b"; grep -E "Failure|FAILED" -A4 "$OUT/$b.log" | head -40; }
    grep -E "^\[  PASSED|^\[  FAILED" "$OUT/$b.log"
  done
fi
for variant in "" ${AB_ENV:+ab}; do  # the head's defaults, then (with AB_ENV) the same under AB_ENV
  run=(env ${variant:+$AB_ENV})
  [ -n "$variant" ] && echo "== under $AB_ENV"
  if [ "${SKIP_OPS:-0}" != 1 ]; then
    timeout 200 "${run[@]}" ./build-gpu/dsv4 bench model --random --layers 4 --batch 1 --ctx 8192 --steps 3 --gemm fp8 \
      --kv-fp8 >"$OUT/ops${variant:+-ab}.log" 2>&1 || rc=1
    grep -E "^\| (expert|moe layer|attn\.w)" "$OUT/ops${variant:+-ab}.log"
  fi
  if [ "${SKIP_BENCH:-0}" != 1 ]; then
    timeout 300 "${run[@]}" ./build-gpu/dsv4 bench model --random --layers "${BENCH_LAYERS:-30}" --batch 1 \
      --ctx "${BENCH_CTX:-8192}" --steps 3 --gemm fp8 --kv-fp8 --no-ops >"$OUT/bench${variant:+-ab}.log" 2>&1 || rc=1
    grep -E "^\| (prefill|decode)" "$OUT/bench${variant:+-ab}.log"
  fi
done
if [ -n "${NCU_KERNEL:-}" ]; then
  run=(./build-gpu/tests/cuda/"${NCU_TEST:-test_cuda_fp8}" --gtest_filter="${NCU_FILTER:-*LinearAllPaths*}")
  skip=${NCU_SKIP:-2}
  if [ "$skip" = largest ]; then  # the launch with the largest grid among the first 16
    timeout 120 ncu --clock-control none --kernel-name "regex:$NCU_KERNEL" --launch-count 16 --section LaunchStats \
      "${run[@]}" >"$OUT/ncu-launches.txt" 2>&1
    skip=$(python3 -c "import re,sys; g=[int(x.replace(',', '')) for x in re.findall(r'^\s+Grid Size\s+(\S+)', open(sys.argv[1]).read(), re.M)]; print(g.index(max(g)) if g else 0)" "$OUT/ncu-launches.txt")
    echo "== ncu: launch $skip (largest grid)"
  fi
  pick=(--clock-control none --kernel-name "regex:$NCU_KERNEL" --launch-skip "$skip" --launch-count 1)
  timeout 120 ncu "${pick[@]}" --section SpeedOfLight --section WarpStateStats --section SchedulerStats \
    --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis --section Occupancy --section SourceCounters \
    "${run[@]}" >"$OUT/ncu-$NCU_KERNEL.txt" 2>&1 || echo "ncu rc=$?"
  grep -E "Duration|Throughput|Issued|Eligible|Active Warps|Stall|ERROR" "$OUT/ncu-$NCU_KERNEL.txt" | head -40
  if [ "${NCU_SASS:-0}" = 1 ]; then
    rep="$OUT/ncu-$NCU_KERNEL-full"
    timeout 200 ncu "${pick[@]}" --set full --import-source yes -o "$rep" "${run[@]}" >"$rep-run.log" 2>&1 ||
      echo "ncu full rc=$?"
    ncu -i "$rep.ncu-rep" --page source --csv --print-source sass >"$rep-sass.csv" 2>&1 && rm -f "$rep.ncu-rep"
    python3 scripts/device/ncu_sass_regions.py "$rep-sass.csv" | tee "$rep-regions.md"
    gzip -f "$rep-sass.csv"
  fi
fi
pack_logs prefill-kernels
echo "== rc=$rc"
exit $rc
