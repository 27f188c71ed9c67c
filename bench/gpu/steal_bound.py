#!/usr/bin/env python3
"""How much could end-only stealing shorten a decode grid? An upper bound from kbench's timeline
(KBENCH_TIMELINE=1, traced build with progress points: -DKBENCH_TRACE, and -DTL_PROG=64 so that
every stage of a CTA of up to 64 stages has a point of its own).

  python3 bench/gpu/steal_bound.py TIMELINE.csv[.gz] [MARKS] [COMMITTED] [LEADS]

MARKS: the build's TL_PROG (16 by default). COMMITTED: the stages after the one a warp is computing
that it has already issued or claimed, so that no thief could take them (the pipeline depth: 2 for
the bf16 kernel at 2 stages with a claim one iteration ahead; 2 by default). LEADS: comma-separated
lead times in us (default 2,3,4,5): how long before the end a thief must claim stages for its partial
row to be written by then (its own victim scan and claim, query and block-table loads, the stolen
stages' round trip, their compute and its epilogue).

Stealing "at the end only" (bench/gpu/NOTES.md run 91): a CTA that is done takes stages from the
back of the range of one still running. At a time t = end - lead, a CTA whose warp 0 has no more
than COMMITTED stages left after its current one has nothing to give, so it ends when it ended;
the grid cannot end before the latest of those (or of the CTAs already done by t). The bound
assumes every CTA that had stages to give could have lost them all at no cost, so the real saving
is smaller (and it pays for the claims and the extra partial rows).

Prints, per run (one launch): the case, its end (us from the first CTA start), each lead's bound,
and the median bound over the runs of each case.
"""
import collections
import statistics as st
import sys

import progress

STAGE_TOKENS = 64  # tokens per stage of the tensor-core kernel (4 warps x 16)


def read_runs(path):
    """Runs (one launch each) as (case, CTAs); a CTA is (end, tokens, {progress point: time}),
    times in us from the run's first CTA start (progress.py reads the file)."""
    runs = []
    for case, ctas in progress.read_runs(path):
        t0 = min(c[2] for c in ctas)
        full = max(c[4] for c in ctas)
        runs.append((f"{case} ({full} tokens per CTA)",
                     [((c[3] - t0) / 1e3, c[4], {k: (v - t0) / 1e3 for k, v in c[5].items() if k >= 0})
                      for c in ctas]))
    return runs


def stages_left(tokens, marks, t, n_marks):
    """Stages warp 0 has not started by time t, after the one it is computing (its last mark
    <= t; a mark is the time of the last stage of its share of the loop)."""
    n = (tokens + STAGE_TOKENS - 1) // STAGE_TOKENS
    last_of = {}
    for it in range(n):
        last_of[it * n_marks // n] = it
    passed = [last_of[k] for k, v in marks.items() if v <= t and k in last_of]
    current = max(passed) if passed else 0
    return n - 1 - current


def bound(ctas, lead, n_marks, committed):
    end = max(c[0] for c in ctas)
    t = end - lead
    fixed = [e for e, tokens, marks in ctas
             if e <= t or stages_left(tokens, marks, t, n_marks) <= committed]
    return end, end - max(fixed) if fixed else end


def end_latencies(ctas, n=10):
    """For the lead: the n last CTAs' interval between their last two progress points (a stage's
    turn at the end of the grid) and from their last point to their end (the last stage's
    compute, the epilogue and the partial row's store), medians in us."""
    last = sorted(ctas, key=lambda c: -c[0])[:n]
    turn = [m[ks[-1]] - m[ks[-2]] for _e, _t, m in last for ks in [sorted(m)] if len(ks) >= 2]
    tail = [e - m[max(m)] for e, _t, m in last if m]
    return (st.median(turn) if turn else float("nan")), (st.median(tail) if tail else float("nan"))


def main(path, n_marks=16, committed=2, leads=(2.0, 3.0, 4.0, 5.0)):
    runs = read_runs(path)
    if not runs:
        sys.exit(f"{path}: no run (a timeline row ends each run with period_ns)")
    by_case = collections.defaultdict(list)
    for key, ctas in runs:
        if not any(m for _e, _t, m in ctas):
            print(f"{key}: no progress points (build kbench with -DKBENCH_TRACE)")
            continue
        bs = [bound(ctas, lead, n_marks, committed) for lead in leads]
        by_case[key].append([b for _end, b in bs])
        turn, tail = end_latencies(ctas)
        print(f"{key}: end {bs[0][0]:.2f} us; saving at most " +
              ", ".join(f"{b:.2f} us (lead {lead:g})" for lead, (_end, b) in zip(leads, bs)) +
              f"; the 10 last CTAs: last stage's turn {turn:.2f} us, last point to end {tail:.2f} us")
    print(f"median over runs (committed stages {committed}, {n_marks} progress points per CTA):")
    for key, rows in by_case.items():
        print(f"  {key}, {len(rows)} runs: " +
              ", ".join(f"lead {lead:g} us: {st.median(r[i] for r in rows):.2f}" for i, lead in enumerate(leads)))


if __name__ == "__main__":
    if not 2 <= len(sys.argv) <= 5:
        sys.exit(__doc__)
    args = sys.argv[1:]
    main(args[0], int(args[1]) if len(args) > 1 else 16, int(args[2]) if len(args) > 2 else 2,
         tuple(float(x) for x in args[3].split(",")) if len(args) > 3 else (2.0, 3.0, 4.0, 5.0))
