#!/usr/bin/env python3
"""Summarize decodebench results.csv files for bench/RESULTS.md (standard library only, so it runs
on the GPU machine as it is).

  summarize.py table DIR...   issue-7 tables: optimized ms and logical TB/s per (batch, max_seq_len)
                              per quant mode, beside FlashInfer's figures, with the ratio (the
                              rows of several run directories are pooled); on a card other than
                              FlashInfer's H100 it adds a bandwidth-normalized ratio (below)
  summarize.py checks DIR     measurement-method checks: telemetry present, energy vs power x time,
                              bandwidth fraction bounds per pool
  summarize.py compare A B    per-case time ratio B/A of the optimized kernel (e.g. cold vs hot L2,
                              graph vs events)
  summarize.py status DIR     status counts per kernel and the wall time spread
  summarize.py layouts DIR    optimized time of each (layout, block size) over HND/block 16 for the
                              same batch, length and quant mode (issue 7, target 5: within 10 %)
  summarize.py targets TABLE [LAYOUTS]
                              issue 7's six targets checked on a table run (and a layouts run),
                              on this card and, on another card than FlashInfer's H100, normalized
                              to the H100's bandwidth

  summarize.py repeats DIR... target 3's ratios (each FP8-query mode's mean_ms over FP8 KV's) cell
                              by cell over several runs of one grid (validate.sh target3), each
                              DIR one run, with the median and the runs over 1.05

  summarize.py ab A_DIR,A_DIR... B_DIR,B_DIR...
                              two kernel versions run alternately on one host (each DIR one run of
                              the same grid): per cell the median over each side's runs of the
                              optimized kernel's mean_ms, B/A, and each side's range

  summarize.py model-check OTHER_MD H100_MD [OTHER_READ_TBS]
                              how well the H100 predictions of 'targets' did: one kernel's table
                              on another card (markdown as 'table' prints it) against the same
                              kernel's table measured on the H100, cell by cell: H100 time over
                              the 'H100 model' and over plain bandwidth scaling

DIR may also name a results.csv or a results.csv.gz (as kept in bench/gpu/logs).
"""
import csv
import gzip
import math
import re
import statistics
import sys
from collections import defaultdict

# FlashInfer 0.7.2 on the same H100 (the tables): best of its two Hopper paths, CUDA-graph
# replay mean in ms. Keys: (batch, max_seq_len).
FLASHINFER_MS = {
    "bf16/bf16/bf16": {
        (1, 1024): 0.0143, (1, 4096): 0.0182, (1, 16384): 0.0380, (1, 65536): 0.1091, (1, 131072): 0.1988,
        (4, 1024): 0.0163, (4, 4096): 0.0293, (4, 16384): 0.0850, (4, 65536): 0.2891, (4, 131072): 0.5279,
        (16, 1024): 0.0227, (16, 4096): 0.0648, (16, 16384): 0.1645, (16, 65536): 0.8358, (16, 131072): 1.2954,
        (64, 1024): 0.0639, (64, 4096): 0.1928, (64, 16384): 0.7920, (64, 65536): 3.1703, (64, 131072): 5.9207,
        (256, 1024): 0.1771, (256, 4096): 0.6666, (256, 16384): 2.5193, (256, 65536): 10.455, (256, 131072): 20.711,
    },
    "bf16/fp8/bf16": {
        (1, 1024): 0.0138, (1, 4096): 0.0160, (1, 16384): 0.0262, (1, 65536): 0.0729, (1, 131072): 0.1304,
        (4, 1024): 0.0197, (4, 4096): 0.0241, (4, 16384): 0.0658, (4, 65536): 0.1901, (4, 131072): 0.3324,
        (16, 1024): 0.0215, (16, 4096): 0.0515, (16, 16384): 0.1301, (16, 65536): 0.6148, (16, 131072): 0.9302,
        (64, 1024): 0.0380, (64, 4096): 0.1148, (64, 16384): 0.4309, (64, 65536): 1.6403, (64, 131072): 3.1274,
        (256, 1024): 0.1057, (256, 4096): 0.3833, (256, 16384): 1.4234, (256, 65536): 5.7979, (256, 131072): 11.490,
    },
}

# The same runs' logical TB/s (the issue's figures in brackets). Their product with the times gives
# the bytes FlashInfer's calls moved, to 2-3 digits: decodebench draws the script's own lengths
# (PyTorch's CUDA generator replayed, seed 0), so its cells read the same bytes, which `table`
# checks (`same_work`). Before that (case ids v1) the lengths were decodebench's own draws, and
# for batches above 1 a cell read up to 27 % more or less than FlashInfer's.
_LENS = [1024, 4096, 16384, 65536, 131072]
_BATCHES = [1, 4, 16, 64, 256]
FLASHINFER_TBS = {
    m: {(b, l): v for b, row in zip(_BATCHES, grid) for l, v in zip(_LENS, row)}
    for m, grid in {
        "bf16/bf16/bf16": [[0.29, 0.92, 1.77, 2.46, 2.70], [0.73, 1.57, 2.37, 2.84, 3.02],
                           [1.56, 2.09, 2.75, 3.02, 3.04], [2.10, 2.69, 2.90, 2.92, 2.91],
                           [3.08, 3.35, 3.45, 3.48, 3.47]],
        "bf16/fp8/bf16": [[0.15, 0.53, 1.28, 1.84, 2.06], [0.31, 0.96, 1.53, 2.16, 2.40],
                          [0.83, 1.32, 1.74, 2.05, 2.12], [1.79, 2.27, 2.66, 2.83, 2.76],
                          [2.62, 2.92, 3.05, 3.14, 3.13]],
    }.items()
}

# Streaming-read bandwidth of the H100 FlashInfer's figures come from (the measurement), TB/s.
FLASHINFER_CARD_READ_TBS = 3.10
FLASHINFER_CARD = "NVIDIA H100 80GB HBM3"


def rows(path):
    if path.endswith(".csv.gz"):
        with gzip.open(path, "rt", newline="") as f:
            return list(csv.DictReader(f))
    with open(path if path.endswith(".csv") else path.rstrip("/") + "/results.csv", newline="") as f:
        return list(csv.DictReader(f))


def num(r, k):
    v = r.get(k, "")
    try:
        return float(v)
    except ValueError:
        return None


def mode(r):
    return f"{r['q_dtype']}/{r['kv_dtype']}/{r['out_dtype']}"


def ok(r):
    return r is not None and r["status"] == "ok"


def optimized_cells(rs):
    """The optimized kernel's rows by mode, then (batch, max_seq_len)."""
    cells = defaultdict(dict)
    for r in rs:
        if r["kernel"] == "optimized":
            cells[mode(r)][(int(r["batch_size"]), int(r["max_seq_len"]))] = r
    return cells


FP8_QUERY_MODES = ("fp8/fp8/bf16", "fp8/fp8/fp8", "fp8/fp8/nvfp4")
# Every quant mode in the order the tables print them: FlashInfer's two, then the FP8-query ones.
MODE_ORDER = tuple(FLASHINFER_MS) + FP8_QUERY_MODES


def fp8_query_ratios(cells, m):
    """Target 3's figure for mode m in each cell: its mean_ms over FP8 KV's (both verified)."""
    kv = cells["bf16/fp8/bf16"]
    return {k: num(r, "mean_ms") / num(kv[k], "mean_ms") for k, r in cells[m].items() if ok(r) and ok(kv.get(k))}


# How far bytes per call may stray from FlashInfer's ms x TB/s with the same lengths: the TB/s
# figures have two decimals (0.15 TB/s at b1 s1024 FP8 KV: +-3.3 %).
SAME_WORK_TOLERANCE = 0.035


def same_work(r, m, key):
    """A FlashInfer cell's row: its bytes per call over the bytes FlashInfer's call moved (its ms
    times its logical TB/s), 1 where both read the same lengths."""
    fi_bytes = FLASHINFER_MS[m][key] * 1e-3 * FLASHINFER_TBS[m][key] * 1e12
    return (num(r, "bytes_per_call") or 0) / fi_bytes


def geomean(xs):
    xs = [x for x in xs if x and x > 0]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def table(*ds):
    rs = [r for d in ds for r in rows(d) if r["kernel"] == "optimized"]
    by_mode = defaultdict(dict)
    for r in rs:
        key = (int(r["batch_size"]), int(r["max_seq_len"]))
        by_mode[mode(r)][key] = r
    cards = sorted({r.get("device_name", "") for r in rs})
    cal = [num(r, "device_calibrated_read_gbps") for r in rs if num(r, "device_calibrated_read_gbps")]
    cal_tbs = sorted(cal)[len(cal) // 2] / 1000 if cal else None
    # FlashInfer's figures were measured on an H100. On another card, time ratios mix the kernels
    # with the cards; the fraction of each card's own streaming-read bandwidth that the kernel
    # reaches (logical bytes) is the comparison that removes the memory system. It is too harsh
    # where a cell is latency-bound (more bandwidth does not shorten a launch), as the raw time
    # ratio is too kind where a cell is bandwidth-bound: the two bracket the same-card answer.
    other_card = cards != [FLASHINFER_CARD] and cal_tbs is not None
    if other_card:
        print(f"\nCard: {', '.join(cards)}, streaming read {cal_tbs:.2f} TB/s (FlashInfer's figures: "
              f"{FLASHINFER_CARD}, {FLASHINFER_CARD_READ_TBS:.2f} TB/s). norm = (ours TB/s / "
              f"{cal_tbs:.2f}) / (FlashInfer TB/s / {FLASHINFER_CARD_READ_TBS:.2f}).")
    fp8kv = by_mode.get("bf16/fp8/bf16", {})
    for m in ["bf16/bf16/bf16", "bf16/fp8/bf16", "fp8/fp8/bf16", "fp8/fp8/fp8", "fp8/fp8/nvfp4"]:
        cells = by_mode.get(m, {})
        if not cells:
            continue
        ref = FLASHINFER_MS.get(m)
        batches = sorted({k[0] for k in cells})
        lens = sorted({k[1] for k in cells})
        print(f"\n### {m}: decodebench optimized ms (logical TB/s)"
              + ((" / FlashInfer ms / FlashInfer÷ours" + (" / norm" if other_card else "")) if ref
                 else " / vs FP8-KV time"))
        print("| batch \\ max_seq_len | " + " | ".join(str(l) for l in lens) + " |")
        print("|---" * (len(lens) + 1) + "|")
        ratios, bw_ratios, norm_ratios, work = [], [], [], []
        for b in batches:
            out = []
            for l in lens:
                r = cells.get((b, l))
                if r is None or r["status"] != "ok":
                    out.append(r["status"] if r else "-")
                    continue
                ms = num(r, "mean_ms")
                tbs = (num(r, "bandwidth_gbps") or 0) / 1000
                cell = f"{ms:.4f} ({tbs:.2f})"
                if ref and (b, l) in ref:
                    ratio = ref[(b, l)] / ms
                    ratios.append(ratio)
                    work.append(same_work(r, m, (b, l)))
                    bw_ratios.append(tbs / FLASHINFER_TBS[m][(b, l)])
                    cell += f" / {ref[(b, l)]:.4f} / {ratio:.2f}x"
                    if other_card:
                        norm = (tbs / cal_tbs) / (FLASHINFER_TBS[m][(b, l)] / FLASHINFER_CARD_READ_TBS)
                        norm_ratios.append(norm)
                        cell += f" / {norm:.2f}"
                elif m.startswith("fp8/") and (b, l) in fp8kv and fp8kv[(b, l)]["status"] == "ok":
                    rel = ms / num(fp8kv[(b, l)], "mean_ms")
                    ratios.append(rel)
                    cell += f" / {rel:.2f}"
                out.append(cell)
            print(f"| {b} | " + " | ".join(out) + " |")
        if ratios:
            what = "FlashInfer÷ours" if ref else "ours÷FP8-KV"
            print(f"\ngeomean {what}: {geomean(ratios):.3f}; min {min(ratios):.2f}, max {max(ratios):.2f} over {len(ratios)} cells")
        if bw_ratios:
            print(f"geomean logical TB/s ours÷FlashInfer (equal work): {geomean(bw_ratios):.3f}; "
                  f"min {min(bw_ratios):.2f}, max {max(bw_ratios):.2f}")
        if work:
            off = [x for x in work if abs(x - 1) > SAME_WORK_TOLERANCE]
            print(f"bytes per call ÷ FlashInfer's (ms x TB/s): {min(work):.3f}-{max(work):.3f}; "
                  + (f"{len(off)} of {len(work)} cells off by more than the figures' rounding: not the "
                     "script's lengths (another seed, or case ids v1)" if off else
                     f"the same work in all {len(work)} cells"))
        if norm_ratios:
            print(f"geomean bandwidth-normalized (norm): {geomean(norm_ratios):.3f}; min {min(norm_ratios):.2f}, "
                  f"max {max(norm_ratios):.2f}; {sum(1 for x in norm_ratios if x < 1)} of {len(norm_ratios)} cells below 1")


def checks(d):
    rs = rows(d)
    ok = [r for r in rs if r["status"] == "ok"]
    print(f"{len(rs)} rows, {len(ok)} ok")
    tele_cols = ["power_avg_w", "energy_per_call_j", "temp_avg_c", "sm_clock_avg_mhz", "mem_clock_avg_mhz", "gpu_util_avg_pct"]
    for c in tele_cols:
        n = sum(1 for r in ok if num(r, c) is not None)
        print(f"  {c:<22} non-null in {n}/{len(ok)}")
    # Energy per call vs average power x mean time.
    errs = []
    for r in ok:
        e, p, t = num(r, "energy_per_call_j"), num(r, "power_avg_w"), num(r, "mean_ms")
        if e and p and t:
            errs.append(e / (p * t * 1e-3))
    if errs:
        errs.sort()
        print(f"  energy/(power*time): median {errs[len(errs)//2]:.3f}, min {errs[0]:.3f}, max {errs[-1]:.3f} (n={len(errs)})")
    for pool in sorted({r["pool"] for r in ok}):
        fr = [num(r, "bandwidth_fraction") for r in ok if r["pool"] == pool and num(r, "bandwidth_fraction")]
        if fr:
            print(f"  pool {pool:<14} bandwidth fraction max {max(fr):.3f} (n={len(fr)})")
    cal = {r.get("device_calibrated_read_gbps") for r in rs}
    print(f"  calibrated read GB/s: {sorted(cal)}")
    thr = defaultdict(int)
    for r in ok:
        for t in (r.get("throttle_reasons") or "").split(","):
            if t:
                thr[t] += 1
    print(f"  throttle reasons seen: {dict(thr)}")


def compare(a, b):
    def key(r):
        return (r["kernel"], mode(r), r["batch_size"], r["max_seq_len"], r["pool"])
    ra = {key(r): r for r in rows(a) if r["status"] == "ok"}
    rb = {key(r): r for r in rows(b) if r["status"] == "ok"}
    print("| kernel | mode | batch | max_seq_len | pool | A median ms | B median ms | B/A |")
    print("|---|---|---|---|---|---|---|---|")
    ratios = defaultdict(list)  # (kernel, mode) -> [(batch, max_seq_len, B/A)]
    for k in sorted(ra.keys() & rb.keys(), key=lambda k: (k[0], k[1], int(k[2]), int(k[3]), k[4])):
        x, y = num(ra[k], "median_ms"), num(rb[k], "median_ms")
        print(f"| {' | '.join(k)} | {x:.4f} | {y:.4f} | {y / x:.3f} |")
        ratios[(k[0], k[1])].append((int(k[2]), int(k[3]), y / x))
    # Per kernel and mode: the geomean of B/A over all cases, over the small ones (batch x length up
    # to 16 x 16384, where a call's fixed costs weigh) and over the rest.
    print()
    print("| kernel | mode | cases | B/A geomean | small (b x s <= 16 x 16384) | larger | min | max |")
    print("|---|---|---|---|---|---|---|---|")
    for (kernel, m), rs in sorted(ratios.items()):
        small = [r for b, s, r in rs if b * s <= 16 * 16384]
        large = [r for b, s, r in rs if b * s > 16 * 16384]
        every = [r for _, _, r in rs]
        part = lambda xs: f"{geomean(xs):.3f} ({len(xs)})" if xs else "-"
        print(f"| {kernel} | {m} | {len(every)} | {geomean(every):.3f} | {part(small)} | {part(large)} "
              f"| {min(every):.3f} | {max(every):.3f} |")


def layout_cases(d):
    """The optimized kernel's ok rows of a layouts run, each with its time over HND/block 16 of the
    same (mode, batch, length) (NaN where that baseline is missing)."""
    rs = [r for r in rows(d) if r["kernel"] == "optimized" and r["status"] == "ok"]
    base = {(mode(r), r["batch_size"], r["max_seq_len"]): num(r, "mean_ms")
            for r in rs if r["kv_layout"] == "HND" and r["block_size"] == "16"}
    out = []
    for r in rs:
        ref = base.get((mode(r), r["batch_size"], r["max_seq_len"]))
        out.append((r, num(r, "mean_ms") / ref if ref else float("nan")))
    return out


def layout_ratios(d):
    """Time over HND/block 16, per (layout, block)."""
    out = defaultdict(list)
    for r, rel in layout_cases(d):
        if rel == rel:
            out[(r["kv_layout"], int(r["block_size"]))].append(rel)
    return out


def layouts(d):
    print("| mode | batch | max_seq_len | layout | block | ms | / HND,16 |")
    print("|---|---|---|---|---|---|---|")
    for r, rel in sorted(layout_cases(d), key=lambda x: (mode(x[0]), int(x[0]["batch_size"]),
                                                          int(x[0]["max_seq_len"]), x[0]["kv_layout"],
                                                          int(x[0]["block_size"]))):
        print(f"| {mode(r)} | {r['batch_size']} | {r['max_seq_len']} | {r['kv_layout']} | "
              f"{r['block_size']} | {num(r, 'mean_ms'):.4f} | {rel:.3f} |")
    print()
    for (layout, block), xs in sorted(layout_ratios(d).items()):
        print(f"{layout} block {block}: worst {max(xs):.3f}, geomean {geomean(xs):.3f} over {len(xs)} cases")


def h100_model_ms(ms, nbytes, read_tbs):
    """A call's time on FlashInfer's H100 by the 'H100 model': its fixed part on a card reading
    `read_tbs` TB/s (its time less its bytes at that rate: launch, first loads, tail, merge, which
    depend on clocks and latencies) kept, its bytes at the H100's read rate added. A call faster
    than the card's read rate (the pool re-read from L2) has no fixed part to find: plain scaling
    by the two read rates then."""
    fixed_ms = ms - nbytes / (read_tbs * 1e9)
    if fixed_ms <= 0:
        return ms * read_tbs / FLASHINFER_CARD_READ_TBS
    return fixed_ms + nbytes / (FLASHINFER_CARD_READ_TBS * 1e9)


def targets(table_dir, layouts_dir=None):
    """Issue 7's targets on one table run. On a card other than FlashInfer's H100, each bandwidth
    figure is also given scaled by 3.10 TB/s over this card's calibrated read: what the same
    fraction of bandwidth would give on the H100 (a prediction for bandwidth-bound cells only).
    Targets 1, 2 and 4 also get a second prediction, 'H100 model': the call's time less its bytes at
    this card's read rate (the fixed part: launch, first loads, tail, merge, which depend on clocks
    and latencies, not bandwidth) plus its bytes at 3.10 TB/s (never below the plain scaling, which
    it equals for calls faster than the read rate). Both are predictions, not measurements.

    Ends with a verdict per target: 'met' or 'NOT met', measured where the card is FlashInfer's
    H100 and by the H100 model elsewhere (targets 3, 5 and 6 are ratios or checks on this card
    either way); target 5 needs a layouts run, and is 'not checked' without one."""
    rs = [r for r in rows(table_dir) if r["kernel"] == "optimized"]
    cells = optimized_cells(rs)
    cards = sorted({r.get("device_name", "") for r in rs})
    cal = sorted(num(r, "device_calibrated_read_gbps") or 0 for r in rs)
    cal_tbs = cal[len(cal) // 2] / 1000 if cal else 0
    other = cards != [FLASHINFER_CARD] and cal_tbs > 0
    scale = FLASHINFER_CARD_READ_TBS / cal_tbs if other else 1.0
    tbs = lambda r: (num(r, "bandwidth_gbps") or 0) / 1000

    def modelled_ms(r):
        # The call's time on FlashInfer's card by the H100 model (see the docstring).
        return h100_model_ms(num(r, "mean_ms"), num(r, "bytes_per_call") or 0, cal_tbs)

    def modelled(r):
        # TB/s on FlashInfer's card by the H100 model.
        return (num(r, "bytes_per_call") or 0) / (modelled_ms(r) * 1e9)
    # What the verdicts read: the H100 model on another card, the measurement on FlashInfer's.
    h100_tbs = modelled if other else tbs
    h100_ms = modelled_ms if other else (lambda r: num(r, "mean_ms"))
    verdict = {}  # target number -> (met, the figure it rests on)
    failed = [r for r in rs if r["status"] != "ok"]
    print(f"card: {', '.join(cards)}, streaming read {cal_tbs:.2f} TB/s" +
          (f"; 'H100-scaled' = x {scale:.3f}" if other else ""))
    # 1. No slower than FlashInfer in every cell; geomean over the 50 cells >= 1.15.
    raw, norm, model = [], [], []
    for m in ("bf16/bf16/bf16", "bf16/fp8/bf16"):
        for key, fi_ms in FLASHINFER_MS[m].items():
            r = cells[m].get(key)
            if not ok(r):
                continue
            raw.append(fi_ms / num(r, "mean_ms"))
            norm.append(tbs(r) * scale / FLASHINFER_TBS[m][key])
            model.append(fi_ms / h100_ms(r))
    if raw:
        print(f"1. FlashInfer÷ours over {len(raw)} cells: geomean {geomean(raw):.3f}, min {min(raw):.2f}, "
              f"{sum(1 for x in raw if x < 1)} below 1 (target: none, geomean >= 1.15)")
        if other:
            print(f"   bandwidth-normalized: geomean {geomean(norm):.3f}, min {min(norm):.2f}, "
                  f"{sum(1 for x in norm if x < 1)} below 1")
            print(f"   H100 model (FlashInfer's ms over the modelled): geomean {geomean(model):.3f}, "
                  f"min {min(model):.2f}, {sum(1 for x in model if x < 1)} below 1")
        n_cells = sum(len(v) for v in FLASHINFER_MS.values())
        verdict[1] = (len(model) == n_cells and min(model) >= 1 and geomean(model) >= 1.15,
                      f"{len(model)} of {n_cells} cells, geomean {geomean(model):.3f}, min {min(model):.2f}")
    # 2. FP8 KV: >= 2.8 TB/s logical where a call reads >= 256 MB.
    big = [r for r in cells["bf16/fp8/bf16"].values() if ok(r) and (num(r, "bytes_per_call") or 0) >= 256e6]
    if big:
        print(f"2. FP8 KV cells reading >= 256 MB: {sum(1 for r in big if tbs(r) >= 2.8)} of {len(big)} "
              f">= 2.8 TB/s (min {min(map(tbs, big)):.2f})" +
              (f"; H100-scaled {sum(1 for r in big if tbs(r) * scale >= 2.8)} of {len(big)}, H100 model "
               f"{sum(1 for r in big if modelled(r) >= 2.8)} of {len(big)} (min {min(map(modelled, big)):.2f})"
               if other else ""))
        short = sorted((int(r["batch_size"]), int(r["max_seq_len"]), h100_tbs(r))
                       for r in big if h100_tbs(r) < 2.8)
        if short:
            print("   under 2.8" + (" by the H100 model" if other else "") + ": "
                  + ", ".join(f"b{b} s{l} {x:.3f}" for b, l, x in short))
        verdict[2] = (not short, f"{len(big) - len(short)} of {len(big)} cells, min {min(map(h100_tbs, big)):.2f} TB/s")
    # 3. FP8-query modes within 5 % of the FP8-KV time.
    worst3 = []
    for m in FP8_QUERY_MODES:
        rel = fp8_query_ratios(cells, m)
        if rel:
            over = sorted(k for k, x in rel.items() if x > 1.05)
            worst3.append((max(rel.values()), m, len(over), len(rel)))
            print(f"3. {m} / FP8 KV: {min(rel.values()):.2f}-{max(rel.values()):.2f}, {len(over)} of "
                  f"{len(rel)} cells over 1.05" + (f": {', '.join(f'b{b} s{l}' for b, l in over)}" if over else ""))
    if worst3:
        w, m, _, _ = max(worst3)
        verdict[3] = (len(worst3) == len(FP8_QUERY_MODES) and all(over == 0 for _, _, over, _ in worst3),
                      f"{sum(n for *_, n in worst3)} cells in {len(worst3)} modes, worst {w:.3f} ({m})")
    # 4. BF16 at batch 1 and 4, 64k and 128k: >= 2.9 TB/s logical.
    t4 = [(k, r) for k, r in sorted(cells["bf16/bf16/bf16"].items())
          if ok(r) and k[0] in (1, 4) and k[1] in (65536, 131072)]
    if t4:
        print("4. BF16 b1/b4 s64k/128k TB/s: " + ", ".join(
            f"b{b} s{l} {tbs(r):.2f}" + (f" ({tbs(r) * scale:.2f} H100-scaled, {modelled(r):.2f} H100 model)"
                                          if other else "") for (b, l), r in t4)
              + " (target >= 2.9)")
        (b, l), r = min(t4, key=lambda kr: h100_tbs(kr[1]))
        verdict[4] = (len(t4) == 4 and h100_tbs(r) >= 2.9,
                      f"{len(t4)} of 4 cells, least b{b} s{l} {h100_tbs(r):.2f} TB/s")
    # 5. Layouts and block sizes within 10 % of HND/16.
    if layouts_dir:
        worst = {k: max(v) for k, v in layout_ratios(layouts_dir).items()}
        (lay, blk), w = max(worst.items(), key=lambda kv: kv[1])
        print(f"5. layouts / HND,16: worst {w:.3f} ({lay} block {blk}; target <= 1.10)")
        verdict[5] = (w <= 1.10, f"worst {w:.3f} ({lay} block {blk})")
    # 6. Every case verified before it was timed.
    print(f"6. {len(rs) - len(failed)} of {len(rs)} table cases verified and timed"
          + (f"; not ok: {', '.join(sorted({r['status'] for r in failed}))}" if failed else ""))
    verdict[6] = (bool(rs) and not failed, f"{len(rs) - len(failed)} of {len(rs)} cases ok")
    print_verdict(verdict, cards, other)


def print_verdict(verdict, cards, other):
    """The per-target verdicts of `targets`, and one line for the issue."""
    how = (f"predicted for FlashInfer's {FLASHINFER_CARD} by the H100 model from {', '.join(cards)}: "
           "targets 1, 2 and 4 are predictions, 3, 5 and 6 measured on this card" if other
           else f"measured on {FLASHINFER_CARD}, FlashInfer's card")
    print(f"verdict ({how}):")
    for t in range(1, 7):
        met, figure = verdict.get(t, (None, "no data (target 5: pass a layouts run)"))
        print(f"  target {t}: {'met' if met else 'not checked' if met is None else 'NOT met'} ({figure})")
    missed = [t for t in range(1, 7) if verdict.get(t, (None,))[0] is False]
    unchecked = [t for t in range(1, 7) if t not in verdict]
    print("issue 7: " + ("NOT met: targets " + ", ".join(map(str, missed)) if missed else
                         "not all checked: targets " + ", ".join(map(str, unchecked)) if unchecked else
                         "all six targets met") + (" (by the H100 model)" if other else ""))


def repeats(*dirs):
    per = defaultdict(list)  # (batch, max_seq_len, mode) -> one ratio per run, in DIR order
    for d in dirs:
        cells = optimized_cells(rows(d))
        for m in FP8_QUERY_MODES:
            for (b, l), x in fp8_query_ratios(cells, m).items():
                per[(b, l, m)].append(x)
    print(f"# per cell, mean_ms over the FP8-KV cell's, {len(dirs)} runs in order:")
    for b, l, m in sorted(per, key=lambda k: (k[0], k[1], FP8_QUERY_MODES.index(k[2]))):
        xs = per[(b, l, m)]
        print(f"# {m} b{b} s{l}: {' '.join(f'{x:.3f}' for x in xs)}  median {statistics.median(xs):.3f}"
              f" ({sum(1 for x in xs if x > 1.05)} over 1.05)")


def ab(a_dirs, b_dirs):
    def side(dirs):
        per = defaultdict(list)  # (mode, batch, max_seq_len) -> mean_ms, one per run
        for d in dirs.split(","):
            for m, cells in optimized_cells(rows(d)).items():
                for (b, l), r in cells.items():
                    if ok(r):
                        per[(m, b, l)].append(num(r, "mean_ms"))
        return per
    a, b = side(a_dirs), side(b_dirs)
    order = lambda k: (k[1], k[2], MODE_ORDER.index(k[0]) if k[0] in MODE_ORDER else len(MODE_ORDER), k[0])
    print("| mode | batch | max_seq_len | A runs | A median ms (range) | B runs | B median ms (range) | B/A |")
    print("|---|---|---|---|---|---|---|---|")
    ratios = []
    for k in sorted(a.keys() & b.keys(), key=order):
        x, y = statistics.median(a[k]), statistics.median(b[k])
        ratios.append(y / x)
        print(f"| {k[0]} | {k[1]} | {k[2]} | {len(a[k])} | {x:.4f} ({min(a[k]):.4f}-{max(a[k]):.4f}) | {len(b[k])} "
              f"| {y:.4f} ({min(b[k]):.4f}-{max(b[k]):.4f}) | {y / x:.3f} |")
    print(f"\nB/A geomean {geomean(ratios):.3f} over {len(ratios)} cells, min {min(ratios):.3f}, max {max(ratios):.3f}")


def markdown_cells(path):
    """{mode: {(batch, max_seq_len index): (ms, TB/s)}} from a table as `table` prints it."""
    cells, current = defaultdict(dict), None
    with open(path) as f:
        for line in f:
            m = re.match(r"#+ (\S+):", line)
            if m:
                current = m.group(1)
                continue
            m = re.match(r"\| (\d+) \| (.*)", line)
            if m and current:
                for i, cell in enumerate(m.group(2).split(" | ")):
                    v = re.match(r"\s*([\d.]+) \(([\d.]+)\)", cell)
                    if v:
                        cells[current][(int(m.group(1)), i)] = (float(v.group(1)), float(v.group(2)))
    return cells


def model_check(other_md, h100_md, other_read_tbs=4.53):
    """The 'H100 model' of `targets` (fixed part kept, bytes at 3.10 TB/s) and plain scaling,
    applied to a table from another card and checked against the same kernel's H100 table."""
    other, h100 = markdown_cells(other_md), markdown_cells(h100_md)
    for m in sorted(set(other) & set(h100)):
        print(m)
        by_model, by_plain = [], []
        for key in sorted(set(other[m]) & set(h100[m])):
            ms, tbs = other[m][key]
            nbytes = ms * 1e-3 * tbs * 1e12
            plain = ms * other_read_tbs / FLASHINFER_CARD_READ_TBS
            model = h100_model_ms(ms, nbytes, other_read_tbs)
            measured = h100[m][key][0]
            by_model.append(measured / model)
            by_plain.append(measured / plain)
            print(f"  b{key[0]:<4} col {key[1]}  other {ms:.4f}  H100 {measured:.4f}  "
                  f"model {model:.4f} ({measured / model:.3f})  plain {plain:.4f} ({measured / plain:.3f})")
        if by_model:
            print(f"  H100 / model: geomean {geomean(by_model):.3f}, {min(by_model):.3f}-{max(by_model):.3f}; "
                  f"H100 / plain: geomean {geomean(by_plain):.3f}, {min(by_plain):.3f}-{max(by_plain):.3f}")


def status(d):
    rs = rows(d)
    counts = defaultdict(int)
    for r in rs:
        counts[(r["kernel"], r["status"])] += 1
    for k, v in sorted(counts.items()):
        print(f"  {k[0]:<10} {k[1]:<13} {v}")
    bad = [r for r in rs if r["status"] not in ("ok",)]
    for r in bad[:10]:
        print(f"  {r['kernel']} {r['case_id']} {r['status']}: {r['message'][:200]}")


if __name__ == "__main__":
    cmd = sys.argv[1] if len(sys.argv) > 1 else ""
    if cmd == "table":
        table(*sys.argv[2:])
    elif cmd == "checks":
        checks(sys.argv[2])
    elif cmd == "compare":
        compare(sys.argv[2], sys.argv[3])
    elif cmd == "status":
        status(sys.argv[2])
    elif cmd == "layouts":
        layouts(sys.argv[2])
    elif cmd == "model-check":
        model_check(sys.argv[2], sys.argv[3], *(float(x) for x in sys.argv[4:5]))
    elif cmd == "ab":
        ab(sys.argv[2], sys.argv[3])
    elif cmd == "repeats":
        repeats(*sys.argv[2:])
    elif cmd == "targets":
        targets(*sys.argv[2:4])
    else:
        print(__doc__)
        sys.exit(2)
