#!/usr/bin/env bash
# Installs, builds and runs the whole test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
[ -x scripts/fetch-test-data.sh ] && scripts/fetch-test-data.sh
scripts/build.sh
cd build
ctest --output-on-failure -j"$(nproc)" --timeout 1200
