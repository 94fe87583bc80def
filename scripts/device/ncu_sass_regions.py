#!/usr/bin/env python3
"""Where one kernel's warps stall, by region of its SASS: the source page of an ncu report
exported with `ncu -i REP --page source --csv --print-source sass` (collected with `--set full
--import-source yes`).

Usage: ncu_sass_regions.py CSV [SPAN]. Prints the stall reasons over the whole kernel, then per
run of SPAN instructions (default 200) its share of the warp-state samples, instructions executed,
most frequent opcodes and top stall reasons: enough to tell the phases of a kernel apart (key
staging, MMAs, softmax, epilogue) and see which one waits and on what.
"""
import collections
import csv
import sys


def main(path, span=200):
    with open(path, newline="", errors="replace") as f:
        rows = list(csv.reader(f))
    head = next((i for i, r in enumerate(rows) if "Warp Stall Sampling (All Samples)" in r), None)
    if head is None:
        print("no 'Warp Stall Sampling (All Samples)' column: not a SASS source page export")
        return
    cols = {name: i for i, name in enumerate(rows[head])}
    data = [r for r in rows[head + 1:] if len(r) >= len(cols)]
    samples, executed, source = cols["Warp Stall Sampling (All Samples)"], cols["Instructions Executed"], cols["Source"]
    stalls = [n for n in cols if n.startswith("stall_") and "Not Issued" not in n]

    def num(r, i):
        try:
            return float(r[i] or 0)
        except ValueError:
            return 0.0

    total = sum(num(r, samples) for r in data) or 1.0
    overall = collections.Counter({n: sum(num(r, cols[n]) for r in data) for n in stalls})
    print(f"{len(data)} instructions, {total:.0f} samples; stall reasons: " +
          ", ".join(f"{n[6:]} {100 * v / total:.1f} %" for n, v in overall.most_common(6)))
    print(f"\n| instructions | samples | executed | opcodes | top stalls |\n|---|---|---|---|---|")
    for lo in range(0, len(data), span):
        part = data[lo:lo + span]
        share = sum(num(r, samples) for r in part)
        ops = collections.Counter()
        for r in part:
            words = [w for w in r[source].split() if not w.startswith("@")]
            if words:
                ops[words[0].split(".")[0]] += 1
        why = collections.Counter({n: sum(num(r, cols[n]) for r in part) for n in stalls})
        why_total = sum(why.values()) or 1.0
        print(f"| {lo}-{lo + len(part) - 1} | {100 * share / total:.1f} % | {sum(num(r, executed) for r in part):.0f} | " +
              ", ".join(f"{k} {v}" for k, v in ops.most_common(4)) + " | " +
              ", ".join(f"{n[6:]} {100 * v / why_total:.0f} %" for n, v in why.most_common(3)) + " |")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 200)
