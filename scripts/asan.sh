#!/usr/bin/env bash
# ASan + UBSan build of the whole CPU test suite, then ctest.
#
#   scripts/asan.sh [ctest args...]        # e.g. scripts/asan.sh -R text.
#
# Configures a separate build in build-asan/ (override with DSV4_ASAN_BUILD) with
# -fsanitize=address,undefined -fno-sanitize-recover=undefined and DSV4_CUDA=OFF, builds
# everything, and runs ctest there. Any sanitizer report aborts the test that triggered it, so a
# clean pass means no finding. DSV4_ASAN_JOBS sets build and ctest parallelism (default: nproc).
# Compiler: CC/CXX (default gcc, the compiler the normal build uses).
set -euo pipefail
cd "$(dirname "$0")/.."
build=${DSV4_ASAN_BUILD:-build-asan}
jobs=${DSV4_ASAN_JOBS:-$(nproc)}
sanitize="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer"
launcher=()
command -v ccache >/dev/null && launcher=(-DCMAKE_C_COMPILER_LAUNCHER=ccache -DCMAKE_CXX_COMPILER_LAUNCHER=ccache)

# -O1 keeps the sanitized tests fast enough while compiling much faster than -O2.
CC=${CC:-gcc} CXX=${CXX:-g++} cmake -S . -B "$build" -G Ninja -DDSV4_CUDA=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_C_FLAGS_RELWITHDEBINFO="-O1 -g" -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -g" \
  -DCMAKE_C_FLAGS="$sanitize" -DCMAKE_CXX_FLAGS="$sanitize" \
  -DCMAKE_EXE_LINKER_FLAGS="$sanitize" -DCMAKE_SHARED_LINKER_FLAGS="$sanitize" "${launcher[@]}" >/dev/null
cmake --build "$build" -j"$jobs"

# Subprocesses (dsv4 serve started by the tests) inherit these.
export ASAN_OPTIONS=${ASAN_OPTIONS:-abort_on_error=1:detect_leaks=1:check_initialization_order=1:strict_init_order=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
cd "$build"
start=$(date +%s)
set +e
ctest --output-on-failure -j"$jobs" --timeout 3600 "$@"
rc=$?
echo "asan.sh: ctest exit status $rc after $(($(date +%s) - start)) s"
exit "$rc"
