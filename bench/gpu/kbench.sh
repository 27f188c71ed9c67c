#!/usr/bin/env bash
# Kernel development bench on a GPU machine (see kbench.cu): builds the bench with nvcc, runs the
# variants over the table cells, then profiles one kernel with Nsight Compute (KBENCH_NCU).
# Usage: bench/gpu/kbench.sh [variant filter] [modes] ; writes to $OUT (or /tmp/kbench_out).
# For an A/B against a commit, run bench/gpu/kbench_prev.sh first and carry bench/gpu/prev.
# bench/gpu/kbench_local.sh builds the same binary on a machine without a GPU, to carry instead.
# Nsight Compute leaves the clocks as they are (--clock-control none).
set -u
OUT=${OUT:-/tmp/kbench_out}
mkdir -p "$OUT"
export PATH=/usr/local/cuda/bin:$PATH
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv,noheader | tee "$OUT/gpu.txt"
( time nvcc -O3 -std=c++17 -arch=sm_90a -ftz=false -prec-div=true -prec-sqrt=true -Xptxas -v \
    -o /tmp/kbench bench/gpu/kbench.cu -lcuda ) > "$OUT/build.txt" 2>&1 || { tail -40 "$OUT/build.txt"; exit 1; }
grep -A2 "k_tc\|decode_mma_d128" "$OUT/build.txt" | grep -E "registers|spill" | sort | uniq -c | head -20
timeout ${KBENCH_TIMEOUT:-400} /tmp/kbench "${1:-}" "${2:-01234}" > "$OUT/kbench.txt" 2>&1; echo "kbench exit $?"
tail -12 "$OUT/kbench.txt"
if [ -n "${KBENCH_NCU:-}" ]; then
  # KBENCH_NCU="variant mode batch seq"
  set -- $KBENCH_NCU
  timeout 200 ncu --clock-control none --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
      --section MemoryWorkloadAnalysis --section SchedulerStats --section InstructionStats -k regex:"k_tc" -c 1 \
      /tmp/kbench "$1" "$2" "$3" "$4" > "$OUT/ncu.txt" 2>&1; echo "ncu exit $?"
  grep -E "k_tc|decode_mma|Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Registers Per|Block Limit|Stall|Issued Ipc|No Eligible|Eligible Warps" "$OUT/ncu.txt" | head -60
fi
