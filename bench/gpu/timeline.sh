#!/usr/bin/env bash
# CTA timelines (bench/gpu/timeline.py) of the s=1024 cells at b = 4, 16 and 64, with the lengths
# decodebench draws for them (seed 0; see kernels/src/workload.rs draw_seq_lens), on the kbench
# kbench built with the phase trace points (KBENCH_TRACE; see decode_mma.cu DB_TRACE).
# Usage: bench/gpu/timeline.sh "variant,variant" [modes] ; writes $OUT/timeline.{csv,txt}.
set -u
OUT=${OUT:-/tmp/kbench_out}
mkdir -p "$OUT"
rm -f "$OUT/timeline.csv"
export PATH=/usr/local/cuda/bin:$PATH
nvcc -O3 -std=c++17 -arch=sm_90a -ftz=false -prec-div=true -prec-sqrt=true -DKBENCH_TRACE \
    -o /tmp/kbench_trace bench/gpu/kbench.cu -lcuda > "$OUT/build-trace.txt" 2>&1 || { tail -20 "$OUT/build-trace.txt"; exit 1; }
declare -A LENS=(
  [4]="87,626,962,1024"
  [16]="87,626,962,958,576,236,774,120,571,15,1000,307,342,488,657,1024"
  [64]="87,626,962,958,576,236,774,120,571,15,1000,307,342,488,657,543,528,287,21,492,812,3,283,806,199,671,911,207,973,667,648,950,233,661,630,269,44,936,872,621,328,181,122,111,744,968,909,671,608,251,426,602,657,306,95,655,382,892,830,277,73,740,191,1024"
)
for b in 4 16 64; do
  KBENCH_TIMELINE=1 KBENCH_TIMELINE_FILE="$OUT/timeline.csv" KBENCH_LENS="${LENS[$b]}" \
    timeout 120 /tmp/kbench_trace "$1" "${2:-01}" "$b" 1024 >> "$OUT/timeline-kbench.txt" 2>&1
done
python3 bench/gpu/timeline.py "$OUT/timeline.csv" | tee "$OUT/timeline.txt"
