#!/usr/bin/env python3
"""Per-kernel table of one forward pass in an `ncu --csv --metrics gpu__time_duration.sum` log.

Usage: ncu_step_summary.py LOG [PASS]. Forward passes are split at each embed_kernel launch; PASS
indexes them (default -1, the last: with `bench model --batch 1 --steps 1` a decode step of one
token; 1 is the bench's prefill, after its warm-up pass). Prints a markdown table (kernel, calls,
us, share).
"""
import csv
import collections
import re
import sys


def short(name):
    name = re.sub(r"\(.*$", "", name)  # parameters
    name = re.sub(r"^void ", "", name)
    for ns in ("dsv4::", "cuda::", "(anonymous namespace)::", "<unnamed>::"):
        name = name.replace(ns, "")
    return name


def main(path, which=-1):
    rows = []
    with open(path, newline="") as f:
        lines = [l for l in f if l.startswith('"')]
    for r in csv.DictReader(lines):
        if r.get("Metric Name") != "gpu__time_duration.sum":
            continue
        rows.append((short(r["Kernel Name"]), float(r["Metric Value"].replace(",", "")) / 1e3))  # ns -> us
    starts = [i for i, (n, _) in enumerate(rows) if n.startswith("embed_kernel")]
    if not starts:
        print("no embed_kernel in the log")
        return
    if not -len(starts) <= which < len(starts):
        print(f"pass {which}: the log has {len(starts)} forward passes")
        return
    first = starts[which]
    later = [i for i in starts if i > first]
    step = rows[first:later[0] if later else len(rows)]
    total = sum(t for _, t in step)
    agg = collections.OrderedDict()
    for n, t in step:
        c, s = agg.get(n, (0, 0.0))
        agg[n] = (c + 1, s + t)
    print(f"Forward pass {which}: {len(step)} kernels, {total:.1f} us (sum of kernel times under ncu)\n")
    print("| kernel | calls | us (sum) | share |")
    print("|---|---|---|---|")
    for n, (c, s) in sorted(agg.items(), key=lambda kv: -kv[1][1]):
        print(f"| {n} | {c} | {s:.1f} | {100 * s / total:.1f} % |")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else -1)
