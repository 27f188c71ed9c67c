#!/usr/bin/env python3
"""How much could end-only stealing shorten a decode grid? An upper bound from kbench's timeline
(KBENCH_TIMELINE=1, traced build with progress points: -DKBENCH_TRACE, and -DTL_PROG=64 so that
every stage of a CTA of up to 64 stages has a point of its own).

  python3 bench/gpu/steal_bound.py TIMELINE.csv[.gz] [MARKS] [COMMITTED] [LEADS]

MARKS: the build's TL_PROG (16 by default; with fewer points than stages, stages left are
counted to the end of a point's share, so the bound is looser: 1.0-1.2 us instead of 0.5 at b1
s65536 BF16). COMMITTED: the stages after the one a warp is computing
that it has already issued or claimed, so that no thief could take them (the pipeline depth: 2 for
the bf16 kernel at 2 stages with a claim one iteration ahead, 4 for e4m3 at 4; 2 by default).
LEADS: comma-separated times in us (default 2,3,4,5) from a thief's claim to its partial row
written (its claim, query and block-table loads, the stolen stages' round trip, their compute and
its epilogue).

Stealing "at the end only" (bench/gpu/NOTES.md runs 91 and 93): a CTA that is done takes stages
from the back of the range of one still running. For the grid to end S us earlier, thieves must
claim by t = end - S - lead, and the new end is no earlier than
  - the end of every CTA that has nothing to give at t (its warp 0 has at most COMMITTED stages
    left after its current one, or it is done): it keeps its own end;
  - t + lead;
  - t + the stages not started by t, read at the grid's own middle rate, + the tail of the last
    CTAs (their last stage's start to their end).
The bound is the largest S over t (0.01-us steps over the grid's last 15 us). It takes the
claims, the spare partial rows and the thieves' search as free, so the real saving is smaller.

Prints, per run (one launch): the case, its end (us from the first CTA start), each lead's bound,
and the median bound over the runs of each case.
"""
import bisect
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


def stage_times(tokens, marks, n_marks):
    """(stages, [(start time, stage index, stages the point stands for)] sorted by time) of warp
    0: a point is the time of the last stage of its share of the loop (every stage its own when
    MARKS >= stages)."""
    n = (tokens + STAGE_TOKENS - 1) // STAGE_TOKENS
    last_of, share = {}, collections.Counter()
    for it in range(n):
        last_of[it * n_marks // n] = it
        share[it * n_marks // n] += 1
    return n, sorted((v, last_of[k], share[k]) for k, v in marks.items() if k in last_of)


def stages_left(stages, times, t):
    """Stages warp 0 has not started by time t, after the one it is computing."""
    i = bisect.bisect_right(times, (t, float("inf"), 0))
    return stages - 1 - (times[i - 1][1] if i else 0)  # a warp starts its stages in order


def middle_rate(ctas):
    """Stages started per us over the middle 60 % of the grid (its read rate, in stages)."""
    end = max(c[0] for c in ctas)
    a, b = 0.2 * end, 0.8 * end
    return sum(c for _e, _n, times in ctas for v, _it, c in times if a <= v < b) / (b - a)


def bound(ctas, lead, committed, tail, step=0.01, window=15.0):
    """The largest saving S (us) that stealing decided at some time t could reach, over t in the
    grid's last `window` us: the new end E = end - S must be no earlier than
      - the end of every CTA with nothing to give at t (at most `committed` stages left after its
        current one, or done), which keeps its own end;
      - t + lead, when the thieves' stages are done;
      - t + (stages not yet started at t) / (the grid's middle read rate) + tail: the bytes still
        to read cannot arrive faster than the grid read them in its middle, and the last CTA to
        get its data still needs `tail` (its last stage's compute, its epilogue, its store).
    Everything else is taken to be free, so the real saving is smaller."""
    end = max(c[0] for c in ctas)
    rate = middle_rate(ctas)
    best, t = 0.0, end - window
    while t < end:
        kept, left = [], 0
        for e, stages, times in ctas:
            rest = stages_left(stages, times, t) if e > t else 0
            left += rest
            if e <= t or rest <= committed:
                kept.append(e)
        new_end = max(max(kept, default=0.0), t + lead, t + left / rate + tail)
        best = max(best, end - new_end)
        t += step
    return end, best


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
        turn, tail = end_latencies(ctas)
        staged = [(e, *stage_times(tokens, marks, n_marks)) for e, tokens, marks in ctas]
        bs = [bound(staged, lead, committed, tail) for lead in leads]
        by_case[key].append([b for _end, b in bs])
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
