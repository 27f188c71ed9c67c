#!/usr/bin/env python3
"""Pools against no pools inside build b of a kbench_ab.sh log (not committed; bench/gpu/prev is
git-ignored): per mode and cell, median over the alternations of cur_X_pN over the median of
cur_X, the mean over X in (lf, hm); one table per pool size and mode, with its geomean.
Usage: pool_ratio.py ab.txt [build (default b)]"""
import collections, math, re, statistics, sys

path, build_wanted = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "b")
t = collections.defaultdict(list)
build = None
for line in open(path):
    m = re.match(r"=== rep \d+ (\w+)", line)
    if m:
        build = m.group(1)
        continue
    f = line.split()
    if build == build_wanted and len(f) > 5 and re.fullmatch(r"[\d.]+", f[4]):
        t[(f[0], f[1], int(f[2]), int(f[3]))].append(float(f[4]))
pools = sorted({v.rsplit("_", 1)[1] for (v, *_ ) in t if re.fullmatch(r"cur_(lf|hm)_p\d+", v)})
for pn in pools:
    for mode in sorted({k[1] for k in t}):
        cells = collections.defaultdict(list)
        for (v, md, b, s), x in t.items():
            if md == mode and v in ("cur_lf", "cur_hm") and (f"{v}_{pn}", md, b, s) in t:
                cells[(b, s)].append(statistics.median(t[(f"{v}_{pn}", md, b, s)]) / statistics.median(x))
        if not cells:
            continue
        r = {k: statistics.mean(v) for k, v in cells.items()}
        seqs = sorted({s for _, s in r})
        print(f"\n{mode}: cur_*_{pn} / cur_* (build {build_wanted})\n")
        print("| batch \\ max_seq_len | " + " | ".join(map(str, seqs)) + " |")
        print("|---" * (len(seqs) + 1) + "|")
        for b in sorted({b for b, _ in r}):
            print(f"| {b} | " + " | ".join(f"{r[(b, s)]:.3f}" if (b, s) in r else "-" for s in seqs) + " |")
        g = math.exp(sum(map(math.log, r.values())) / len(r))
        print(f"\ngeomean {g:.4f} over {len(r)} cells; min {min(r.values()):.3f}, max {max(r.values()):.3f}")
