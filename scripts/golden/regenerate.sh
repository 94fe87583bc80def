#!/usr/bin/env bash
# Regenerates every golden fixture directory: scripts/golden/configs/<name>.json -> <outdir>/<name>/.
# Needs python with transformers (>= 5.17, DeepseekV4ForCausalLM), torch, numpy, safetensors:
# run it on the device machine (see docs/TESTING.md, 'Golden fixtures').
#   bash scripts/golden/regenerate.sh [outdir=tests/data/golden] [config names...]
# Extra arguments for make_golden.py can be given in GOLDEN_ARGS (e.g. GOLDEN_ARGS=--dump-layers).
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
out="${1:-tests/data/golden}"
shift || true
mkdir -p "$out"
out="$(cd "$out" && pwd)"
names=("$@")
if [ ${#names[@]} -eq 0 ]; then names=(tiny tiny-fp8 mini3); fi
declare -A seed=([tiny]=1 [tiny-fp8]=2 [mini3]=3)
export PYTHONUNBUFFERED=1
cd "$root"
for n in "${names[@]}"; do
  echo "=== $n"
  rm -rf "${out:?}/$n"
  python scripts/golden/make_golden.py --config "scripts/golden/configs/$n.json" --seed "${seed[$n]:-7}" \
    --out "$out/$n" ${GOLDEN_ARGS:-}
done
