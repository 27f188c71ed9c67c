#!/usr/bin/env python3
"""B÷A per table cell from kbench_ab.sh's log: for each mode, cell and variant the median over the
alternations of each build's times, then the mean of the variants' ratios; one table per mode and
its geometric mean. Usage: kbench_ab.py ab.txt [variant ...] (default: every variant in the log)."""
import collections
import math
import re
import statistics
import sys


def main(path, wanted):
    times = collections.defaultdict(lambda: collections.defaultdict(list))
    build = None
    for line in open(path):
        m = re.match(r"=== rep \d+ (\w+)", line)
        if m:
            build = {"old": "a", "new": "b"}.get(m.group(1), m.group(1))  # the early logs' labels
            continue
        f = line.split()
        if build and len(f) > 5 and re.fullmatch(r"[\d.]+", f[4]) and (not wanted or f[0] in wanted):
            times[(f[1], int(f[2]), int(f[3]), f[0])][build].append(float(f[4]))
    ratios = collections.defaultdict(list)
    for (mode, b, s, _), t in times.items():
        if t["a"] and t["b"]:
            ratios[(mode, b, s)].append(statistics.median(t["b"]) / statistics.median(t["a"]))
    if not ratios:
        sys.exit(f"{path}: no cell was timed by both builds")
    for mode in sorted({k[0] for k in ratios}):
        cells = {(b, s): statistics.mean(r) for (m, b, s), r in ratios.items() if m == mode}
        batches = sorted({b for b, _ in cells})
        seqs = sorted({s for _, s in cells})
        print(f"\n{mode}: B÷A\n")
        print("| batch \\ max_seq_len | " + " | ".join(map(str, seqs)) + " |")
        print("|---" * (len(seqs) + 1) + "|")
        for b in batches:
            row = [f"{cells[(b, s)]:.3f}" if (b, s) in cells else "-" for s in seqs]
            print(f"| {b} | " + " | ".join(row) + " |")
        g = math.exp(sum(map(math.log, cells.values())) / len(cells))
        print(f"\ngeomean {g:.4f} over {len(cells)} cells; min {min(cells.values()):.3f}, max {max(cells.values()):.3f}")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1], set(sys.argv[2:]))
