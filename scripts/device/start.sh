# Sourced first by the device scripts that build (`source "$(dirname "$0")/start.sh" NAME`): from
# the repository root, all output also logged to $OUT/NAME.log, the GPU named, the carried
# dependencies unpacked (.deps), and build_gpu TARGET... (the sm_90a Release build into
# build-gpu; its configure log in $OUT, its time printed; the script exits when it fails).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/$1.log") 2>&1
echo "== $(date -u +%FT%TZ) commit ${GIT_COMMIT:-unknown}"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem --format=csv,noheader || true
eval "$(bash scripts/device/setup-deps.sh)" || exit 1

build_gpu() {
  local t0
  t0=$(date +%s)
  cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DDSV4_CUDA_ARCHS=90a -DCMAKE_CUDA_FLAGS=-lineinfo \
    >"$OUT/configure.log" 2>&1 || { tail -40 "$OUT/configure.log"; exit 1; }
  cmake --build build-gpu -j"${JOBS:-16}" --target "$@" 2>&1 | tail -25
  [ "${PIPESTATUS[0]}" = 0 ] || { echo "BUILD FAILED"; exit 1; }
  echo "== build: $(( $(date +%s) - t0 )) s"
}

# The device tool returns at most 8 files from $OUT: pack_logs NAME puts every *.log but NAME.log
# (still being written) into $OUT/logs.tgz.
pack_logs() {
  (cd "$OUT" && ls *.log | grep -vx "$1.log" | tar czf logs.tgz --remove-files -T -) || true
}
