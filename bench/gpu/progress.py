#!/usr/bin/env python3
"""Per-SM speed and read progress of the decode grid, from kbench's timeline CSV (KBENCH_TIMELINE=1;
the progress points need the traced build, -DKBENCH_TRACE). Several kbench runs may append to one
file, of one case or of several; each run is one launch, and each case (variant, mode, batch, CTA
length) is reported on its own. The file may be gzipped, as kept in bench/gpu/logs.

  python3 bench/gpu/progress.py timeline.csv BYTES_PER_TOKEN

BYTES_PER_TOKEN: K and V bytes of one token of one kv head (head 128: 512 for a bf16 cache, 256
for e4m3), the same for every case of the file. Prints, per run, the CTA durations and the
aggregate read rate per microsecond (each sixteenth of a CTA's tokens spread over the time its warp
0 took to pass it); then whether the same SMs are fast in every run (correlation of the per-SM mean
deviation between runs) and how fast the CTAs of the fast and the other SMs go through the middle
of their tokens and through the last quarter (bench/gpu/NOTES.md, calls 99-100). It reads the
default build's 16 progress points per CTA (TL_PROG in kbench.cu), not a -DTL_PROG=64 build's.
"""
import collections
import gzip
import itertools
import statistics as st
import sys


def read_runs(path):
    """Runs (a timeline CSV, or one gzipped as in bench/gpu/logs) as (case, CTAs): the case is
    "variant mode M bB"; a CTA is (index, sm, start, end, tokens, {progress point: time}), the
    points in ns on the global timer, -1 being phase 5 (the first stage in shared memory), where
    the first point's share of the loop starts. Also read by steal_bound.py."""
    runs, ctas, marks = [], {}, collections.defaultdict(dict)
    with (gzip.open(path, "rt") if path.endswith(".gz") else open(path)) as f:
        for line in f:
            name, mode, batch, kind, idx, sm, start, end, tokens = line.strip().split(",")
            i = int(idx)
            if kind == "decode" and int(start) > 0:
                ctas[i] = (i, int(sm), int(start), int(end), int(tokens))
            elif kind.startswith("prog"):
                marks[i][int(kind[4:])] = int(end)
            elif kind == "phase5":
                marks[i][-1] = int(end)
            elif kind == "period_ns":
                runs.append((f"{name} mode {mode} b{batch}", [c + (marks[c[0]],) for c in ctas.values()]))
                ctas, marks = {}, collections.defaultdict(dict)
    return runs


def corr(a, b):
    ma, mb = st.mean(a), st.mean(b)
    num = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    den = (sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b)) ** 0.5
    return num / den if den else 0.0


def main(path, bytes_per_token):
    runs = read_runs(path)
    if not runs:
        sys.exit(f"{path}: no run (a timeline row ends each run with period_ns)")
    # One report per case (variant, mode, batch and CTA length): a file may hold several.
    cases = collections.defaultdict(list)
    for case, ctas in runs:
        cases[f"{case}, {max(c[4] for c in ctas)} tokens per CTA"].append(ctas)
    for case, case_runs in cases.items():
        print(f"== {case}: {len(case_runs)} runs")
        report(case_runs, bytes_per_token)


def report(runs, bytes_per_token):
    """The runs of one case."""
    full = max(c[4] for c in runs[0])
    deviation = []  # per run: SM -> mean (CTA duration - median) over its full-length CTAs, us
    for r in runs:
        t0 = min(c[2] for c in r)
        durs = sorted((c[3] - c[2]) / 1e3 for c in r if c[4] == full)
        med = st.median(durs)
        by_sm = collections.defaultdict(list)
        for c in r:
            if c[4] == full:
                by_sm[c[1]].append((c[3] - c[2]) / 1e3 - med)
        deviation.append({sm: st.mean(v) for sm, v in by_sm.items()})
        print(f"run: {len(r)} CTAs, full-length CTA us median {med:.2f} p10 {durs[len(durs) // 10]:.2f} "
              f"max {durs[-1]:.2f}; last end {max(c[3] - t0 for c in r) / 1e3:.2f}")
        bins = collections.defaultdict(float)
        for c in r:
            marks = c[5]
            if -1 not in marks:
                continue
            part, prev = c[4] * bytes_per_token / 16, marks[-1] - t0
            for k in sorted(k for k in marks if k >= 0):
                a, b = prev, marks[k] - t0
                prev = b
                x = a
                while x < b:
                    nxt = min(b, (x // 1000 + 1) * 1000)
                    bins[int(x // 1000)] += part * (nxt - x) / (b - a)
                    x = nxt
        if bins:
            print("  read rate per us (TB/s): " + " ".join(f"{bins[k] / 1e6:.2f}" for k in range(max(bins) + 1)))
    sms = sorted(set.intersection(*[set(d) for d in deviation]))
    mean_dev = {sm: st.mean(d[sm] for d in deviation) for sm in sms}
    if len(runs) > 1:
        cs = [corr([deviation[i][s] for s in sms], [deviation[j][s] for s in sms])
              for i, j in itertools.combinations(range(len(runs)), 2)]
        print(f"per-SM mean deviation, correlation between runs: median {st.median(cs):.2f}, "
              f"min {min(cs):.2f} ({len(cs)} pairs, {len(sms)} SMs)")
    # The fast SMs: below the midpoint between the fastest SM's and the median SM's deviation.
    cut = (min(mean_dev.values()) + st.median(mean_dev.values())) / 2
    fast = {sm for sm, d in mean_dev.items() if d < cut}
    print(f"fast SMs ({len(fast)} of {len(sms)}, mean deviation below {cut:+.2f} us): {sorted(fast)}")
    for label, members in (("fast", True), ("other", False)):
        mid, last, ends = [], [], []
        for r in runs:
            t0 = min(c[2] for c in r)
            for c in r:
                m = c[5]
                if c[4] != full or (c[1] in fast) != members or not all(k in m for k in (3, 11, 15)):
                    continue
                mid.append((m[11] - m[3]) / 8e3)
                last.append((m[15] - m[11]) / 4e3)
                ends.append((m[15] - t0) / 1e3)
        if mid:
            print(f"  {label} SMs' CTAs (n={len(mid)}): us per sixteenth of their tokens, middle half "
                  f"{st.median(mid):.2f}, last quarter {st.median(last):.2f}; last stage passed at "
                  f"{st.median(ends):.2f} us (median)")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], float(sys.argv[2]))
