#!/usr/bin/env bash
# The main job on a fresh machine: install, build, run. With no model given, the committed demo
# model models/demo-brown (a small DeepSeek-V4 trained on the Brown corpus, docs/DEMO_MODEL.md) on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/build.sh
if ./build/dsv4 serve --help >/dev/null 2>&1; then
  exec ./build/dsv4 serve "$@"
fi
demo="${TMPDIR:-/tmp}/dsv4-demo-model"
./build/dsv4 make-tiny --out "$demo"
exec ./build/dsv4 inspect --model "$demo"
