#!/usr/bin/env python3
"""Summarizes kbench's CTA timeline (KBENCH_TIMELINE=1): per variant, mode and batch, where the
time of one launch goes. Times in microseconds from the decode kernel's first CTA start.

  python3 bench/gpu/timeline.py timeline.csv
"""
import collections
import statistics
import sys

MODES = ["bf16/bf16/bf16", "bf16/fp8/bf16", "fp8/fp8/bf16", "fp8/fp8/fp8", "fp8/fp8/nvfp4"]


def main(path):
    runs = collections.defaultdict(lambda: {"decode": [], "merge": [], "period": 0.0,
                                            "phase": collections.defaultdict(list),
                                            "mphase": collections.defaultdict(list)})
    # A run's rows end with its period_ns row: the same variant, mode and batch again (another
    # sequence length) is the next run of that key.
    nth = collections.Counter()
    with open(path) as f:
        for line in f:
            name, mode, batch, kind, idx, sm, start, end, tokens = line.strip().split(",")
            key = (name, int(mode), int(batch))
            r = runs[key + (nth[key],)]
            if kind == "period_ns":
                r["period"] = int(end) / 1e3
                nth[key] += 1
            elif kind.startswith("prog"):
                continue  # progress points: bench/gpu/progress.py
            elif kind.startswith("mphase"):
                r["mphase"][int(kind[6:])].append(int(end))
            elif kind.startswith("phase"):
                # Time of the trace point since the CTA's start, by the CTA's token count.
                r["phase"][int(kind[5:])].append(((int(end) - int(start)) / 1e3, int(tokens)))
            else:
                r[kind].append((int(sm), int(start), int(end), int(tokens)))
    for (name, mode, batch, _), r in sorted(runs.items(), key=lambda kv: (kv[0][2], kv[0][3], kv[0][1], kv[0][0])):
        dec = [x for x in r["decode"] if x[1] > 0]
        if not dec:
            continue
        t0 = min(x[1] for x in dec)
        us = lambda t: (t - t0) / 1e3
        dur = sorted((x[2] - x[1]) / 1e3 for x in dec)
        q = lambda p: dur[min(len(dur) - 1, int(p * len(dur)))]
        starts = sorted(us(x[1]) for x in dec)
        ends = sorted(us(x[2]) for x in dec)
        per_sm = collections.Counter(x[0] for x in dec)
        longest = max(x[3] for x in dec)
        print(f"{name:12s} {MODES[mode]:14s} b{batch:<4d} (longest CTA {longest} tokens) "
              f"period {r['period']:6.2f} us | decode: "
              f"{len(dec)} CTAs on {len(per_sm)} SMs (max {max(per_sm.values())}/SM), "
              f"last start {starts[-1]:5.2f}, first end {ends[0]:5.2f}, last end {ends[-1]:5.2f}; "
              f"CTA us min/med/p90/max {dur[0]:.2f}/{q(0.5):.2f}/{q(0.9):.2f}/{dur[-1]:.2f}")
        by_tok = collections.defaultdict(list)
        for x in dec:
            by_tok[(x[3] + 63) // 64 * 64].append((x[2] - x[1]) / 1e3)
        print("    CTA us by tokens (rounded up to 64): " + ", ".join(
            f"{k}: {statistics.median(v):.2f} (n={len(v)})" for k, v in sorted(by_tok.items())))
        mer = [x for x in r["merge"] if x[1] > 0]
        if mer:
            ms = sorted(us(x[1]) for x in mer)
            me = sorted(us(x[2]) for x in mer)
            md = sorted((x[2] - x[1]) / 1e3 for x in mer)
            print(f"    merge: {len(mer)} CTAs, first start {ms[0]:.2f}, median start {ms[len(ms)//2]:.2f}, "
                  f"first end {me[0]:.2f}, last end {me[-1]:.2f}; CTA us med/max {md[len(md)//2]:.2f}/{md[-1]:.2f}")
            if r["mphase"]:
                # The merge's trace points (DB_MERGE_TRACE): released from its wait for the decode
                # grid, loads and sums done; first and median over its CTAs, from the decode start.
                pts = []
                for k in sorted(r["mphase"]):
                    v = sorted(us(t) for t in r["mphase"][k])
                    pts.append(f"{k}: {v[0]:.2f}/{v[len(v) // 2]:.2f}")
                print("    merge phases (first/median, us; 0 released, 3 first loads in, 5 all loads in, 6 weighted sums done (rows of several warps), 1 summed and triggered, 2 all warps summed, 4 stored): " + ", ".join(pts))
            busy = me[-1]
        else:
            busy = ends[-1]
        print(f"    launch gap (period - decode start to last end): {r['period'] - busy:.2f} us")
        if r["phase"]:
            # Median time of each trace point (thread 0) since the CTA's start (see DB_TRACE in
            # decode_mma.cu), for the CTAs of the most common token count.
            common = collections.Counter(t for _, t in r["phase"][0]).most_common(1)[0][0]
            pts = []
            for k in sorted(r["phase"]):
                v = [x for x, t in r["phase"][k] if t == common]
                if v:
                    pts.append(f"{k}:{statistics.median(v):.2f}")
            print(f"    phases ({common}-token CTAs, us since CTA start): " + " ".join(pts))


if __name__ == "__main__":
    main(sys.argv[1])
