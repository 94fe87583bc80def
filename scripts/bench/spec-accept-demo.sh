#!/usr/bin/env bash
# Mean acceptance length of speculative decoding with the demo model's MTP block on held-out text
# (docs/PERF.md): for each of the first N held-out files (test.txt of scripts/demo/prepare.sh,
# one file per line), its first WORDS words are a raw prompt; `dsv4 generate` continues it with
# MAX_TOKENS tokens at --speculative-tokens k = 1, 2, 3 (greedy unless TEMPERATURE is set).
# Prints, per k, drafts, accepted drafts, verify steps and the mean acceptance length (tokens per
# verify step) summed over the prompts.
# Usage: [KS="1 2 3"] [TEMPERATURE=0] scripts/bench/spec-accept-demo.sh TEST_TXT [N=10] [WORDS=48] [MAX_TOKENS=64]
set -euo pipefail
cd "$(dirname "$0")/../.."
test_txt="$1"; n="${2:-10}"; words="${3:-48}"; max_tokens="${4:-64}"; temperature="${TEMPERATURE:-0}"
for k in ${KS:-1 2 3}; do
  drafts=0; accepted=0; steps=0
  while IFS= read -r line; do
    prompt=$(awk -v n="$words" '{ for (i = 1; i <= n && i <= NF; ++i) printf "%s ", $i }' <<< "$line")
    stats=$(./build/dsv4 generate --raw --prompt "$prompt" --max-tokens "$max_tokens" --temperature "$temperature" \
      --seed 1 --speculative-tokens "$k" --usage 2>&1 >/dev/null | sed -n 's/^speculative: \([0-9]*\) drafts, \([0-9]*\) accepted, .* over \([0-9]*\) steps$/\1 \2 \3/p')
    [ -n "$stats" ] || { echo "dsv4 generate failed (k=$k)" >&2; exit 1; }
    read -r d a s <<< "$stats"
    drafts=$((drafts + d)); accepted=$((accepted + a)); steps=$((steps + s))
  done < <(head -n "$n" "$test_txt")
  awk -v k="$k" -v d="$drafts" -v a="$accepted" -v s="$steps" \
    'BEGIN { printf "k=%d: %d drafts, %d accepted (%.1f %%), %d verify steps, mean acceptance length %.3f\n", k, d, a, 100 * a / d, s, (a + s) / s }'
done
