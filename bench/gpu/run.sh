#!/usr/bin/env bash
# Runs the CUDA backend's checks on a GPU machine: probe, NVRTC compile then cache start,
# self-test, and the timed sweep. Expects target/release/examples/gpu_check (built on the
# development machine and carried over) and writes everything under $OUT.
# Usage: bench/gpu/run.sh [selftest|bench|all] [quick]
set -u
MODE=${1:-all}
QUICK=${2:-}
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export DECODEBENCH_CACHE_DIR=${DECODEBENCH_CACHE_DIR:-/tmp/decodebench-cache}
BIN=target/release/examples/gpu_check
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw,memory.used --format=csv | tee "$OUT/nvidia-smi.txt"
"$BIN" probe
echo "--- first start (NVRTC) and second start (cache)"
( time "$BIN" compile 9.0 ) 2>&1 | grep -v '^$' | head -4
( time "$BIN" compile 9.0 ) 2>&1 | grep -v '^$' | head -4
if [ "$MODE" = selftest ] || [ "$MODE" = all ]; then
  echo "--- selftest"
  timeout 300 "$BIN" selftest $QUICK > "$OUT/selftest_stdout.txt" 2>&1
  echo "selftest exit $?"
  grep -E "^FAIL|selftest:|cubin|ptx" "$OUT/selftest_stdout.txt" | head -40
fi
if [ "$MODE" = bench ] || [ "$MODE" = all ]; then
  echo "--- bench"
  timeout 400 "$BIN" bench $QUICK > "$OUT/bench_stdout.txt" 2>&1
  echo "bench exit $?"
  grep -vE "^ +Some\(|^device" "$OUT/bench_stdout.txt" | cut -c1-200 | head -90
fi
