#!/usr/bin/env bash
# CTA timelines (bench/gpu/timeline.py) of the s=1024 cells at b = 4, 16 and 64, with the lengths
# decodebench draws for them (seed 0, the reference script's own draws since ids v2; see
# kernels/src/workload.rs draw_seq_lens), on the kbench built with the phase trace points
# (KBENCH_TRACE; see decode_mma.cu DB_TRACE).
# Usage: bench/gpu/timeline.sh "variant,variant" [modes] ; writes $OUT/timeline.{csv,txt}.
set -u
OUT=${OUT:-/tmp/kbench_out}
mkdir -p "$OUT"
rm -f "$OUT/timeline.csv"
export PATH=/usr/local/cuda/bin:$PATH
nvcc -O3 -std=c++17 -arch=sm_90a -ftz=false -prec-div=true -prec-sqrt=true -DKBENCH_TRACE \
    -o /tmp/kbench_trace bench/gpu/kbench.cu -lcuda > "$OUT/build-trace.txt" 2>&1 || { tail -20 "$OUT/build-trace.txt"; exit 1; }
declare -A LENS=(
  [4]="362,647,838,1024"
  [16]="362,647,838,619,51,667,823,328,913,363,2,511,273,261,827,1024"
  [64]="362,647,838,619,51,667,823,328,913,363,2,511,273,261,827,569,295,106,275,735,386,128,803,206,907,47,377,475,886,389,181,834,615,666,288,147,562,688,946,894,253,879,646,719,231,400,329,147,609,865,522,904,492,973,360,119,874,980,451,98,129,116,227,1024"
)
for b in 4 16 64; do
  KBENCH_TIMELINE=1 KBENCH_TIMELINE_FILE="$OUT/timeline.csv" KBENCH_LENS="${LENS[$b]}" \
    timeout 120 /tmp/kbench_trace "$1" "${2:-01}" "$b" 1024 >> "$OUT/timeline-kbench.txt" 2>&1
done
python3 bench/gpu/timeline.py "$OUT/timeline.csv" | tee "$OUT/timeline.txt"
