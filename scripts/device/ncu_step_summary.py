#!/usr/bin/env python3
"""Per-kernel table of the last forward pass in an `ncu --csv --metrics gpu__time_duration.sum` log.

Forward passes are split at each embed_kernel launch; with `bench model --batch 1 --steps 1`
the last one is a decode step of one token. Prints a markdown table (kernel, calls, us, share).
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


def main(path):
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
    step = rows[starts[-1]:]
    total = sum(t for _, t in step)
    agg = collections.OrderedDict()
    for n, t in step:
        c, s = agg.get(n, (0, 0.0))
        agg[n] = (c + 1, s + t)
    print(f"Last forward pass: {len(step)} kernels, {total:.1f} us (sum of kernel times under ncu)\n")
    print("| kernel | calls | us (sum) | share |")
    print("|---|---|---|---|")
    for n, (c, s) in sorted(agg.items(), key=lambda kv: -kv[1][1]):
        print(f"| {n} | {c} | {s:.1f} | {100 * s / total:.1f} % |")


if __name__ == "__main__":
    main(sys.argv[1])
