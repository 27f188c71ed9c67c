#!/usr/bin/env bash
# On the GPU machine: alternates the two kbench builds of kbench_ab_build.sh (a, b, a, b, ...),
# each run in both orders of its variants (KBENCH_ABBA), and appends everything to $OUT/ab.txt
# with a `=== rep N a|b` line before each run. Read it with bench/gpu/kbench_ab.py.
# Usage: bench/gpu/kbench_ab.sh VARIANTS [MODES [REPS [BATCH SEQ]]]
#   VARIANTS: kbench's filter, best a comma-separated list of whole names ("cur_lf,cur_hm");
#   MODES: kbench's mode digits (default 01); REPS: alternations (default 2); BATCH SEQ: one cell.
# A whole-table run of two variants in modes 01 takes about 20 s per binary and alternation on an
# H200; give each run a timeout that fits the call.
set -u
OUT=${OUT:-/tmp/kbench_out}
mkdir -p "$OUT"
variants=${1:?usage: kbench_ab.sh VARIANTS [MODES [REPS [BATCH SEQ]]]}
modes=${2:-01}
reps=${3:-2}
cell=("${@:4}")
per_run=${KBENCH_AB_TIMEOUT:-90}
for rep in $(seq 1 "$reps"); do
  for v in a b; do
    echo "=== rep $rep $v" >> "$OUT/ab.txt"
    KBENCH_ABBA=1 timeout "$per_run" bench/gpu/prev/bin/kbench_$v "$variants" "$modes" "${cell[@]}" >> "$OUT/ab.txt" 2>&1 \
      || echo "kbench_$v rep $rep: exit $?" | tee -a "$OUT/ab.txt"
  done
done
grep -c '^=== rep' "$OUT/ab.txt"
