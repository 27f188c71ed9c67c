#!/usr/bin/env bash
# Multi-GPU checks on one host (a machine with N >= 2 GPUs), as a fleet user would run them:
#   scaling  the seed preset on GPU 0 alone, then on every GPU (`decodebench run`, spread
#            placement): wall times, the speedup against N, and the per-agent split of the work;
#   pergpu   every case of the seed preset (optimized kernel) on every GPU (per-gpu placement),
#            then `decodebench report --group-by gpu`: the spread between identical cards;
#   kill     one coordinator and one `decodebench agent` process per GPU; the agent on the last
#            GPU is killed with SIGKILL mid-run; its cases must finish on the others, each once.
# Expects target/release/decodebench (or $DECODEBENCH_BIN); logs under $OUT (default /tmp/multigpu_out).
# Usage: bench/gpu/multigpu.sh [warm] [scaling] [pergpu] [kill]   (default: all four)
# MULTIGPU_DRY=2 checks the script here without a GPU: the kill step with 2 CPU agents on `smoke`.
# MULTIGPU_AGENTS=K runs the kill step with K agent processes, agent i on GPU i mod N (on a
# one-GPU machine, K = 2 shows the failover between two CUDA agents sharing the card).
set -u
RESULT_DIR=${OUT:-/tmp/multigpu_out}
L=/tmp/multigpu_logs
mkdir -p "$L" "$RESULT_DIR"
trap 'tar czf "$RESULT_DIR/multigpu-$(date +%H%M%S).tgz" -C /tmp multigpu_logs; cp "$L"/*.txt "$RESULT_DIR"/ 2>/dev/null' EXIT
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export DECODEBENCH_CACHE_DIR=${DECODEBENCH_CACHE_DIR:-/tmp/decodebench-cache}
B=${DECODEBENCH_BIN:-$PWD/target/release/decodebench}
S="python3 $PWD/bench/gpu/summarize.py"
W=/tmp/multigpu_runs
mkdir -p "$W"
STEPS=${*:-warm scaling pergpu kill}
if [ -n "${MULTIGPU_DRY:-}" ]; then
  N=$MULTIGPU_DRY; PRESET=smoke; KILL_AT=5
  agent_device() { echo "--backend cpu"; }
else
  N=$(nvidia-smi -L | grep -c '^GPU'); PRESET=seed; KILL_AT=80
  agent_device() { echo "--gpu $(( $1 % N ))"; }
fi
AGENTS=${MULTIGPU_AGENTS:-$N}
[ -n "${MULTIGPU_DRY:-}" ] || nvidia-smi --query-gpu=index,name,uuid,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv,noheader | tee "$L/gpus.txt"
echo "gpus: $N" | tee -a "$L/gpus.txt"

# Rows per agent and device (the agent_id and device_uuid columns of results.csv), and the verdicts.
per_gpu() {
  python3 - "$1" <<'EOF'
import csv, sys, collections
rows = list(csv.DictReader(open(sys.argv[1] + "/results.csv")))
by = collections.Counter((r.get("agent_id", "?"), r.get("device_uuid", "?")[:16]) for r in rows)
cases = collections.Counter(r["case_id"] for r in rows)
status = collections.Counter(r.get("status", "?") for r in rows)
print(f"rows {len(rows)}, distinct cases {len(cases)}, rows per case {sorted(set(cases.values()))}, status {dict(status)}")
for (a, u), n in sorted(by.items()):
    print(f"  agent {a} on {u}...: {n} rows")
EOF
}

for step in $STEPS; do
  case $step in
    warm)
      echo "=== precompile (fills the module cache, so the timed runs below start alike)"
      ( time timeout 200 $B precompile ) > "$L/precompile.txt" 2>&1; echo "precompile exit $?"
      tail -3 "$L/precompile.txt" ;;
    scaling)
      echo "=== seed preset, GPU 0 alone"
      rm -rf $W/single
      ( time timeout 400 $B run --gpus 0 --out $W/single ) > "$L/single.log" 2>&1; echo "single exit $?"
      grep -E "^real|units done" "$L/single.log"
      echo "=== seed preset, all $N GPUs (spread)"
      rm -rf $W/spread
      ( time timeout 400 $B run --out $W/spread ) > "$L/spread.log" 2>&1; echo "spread exit $?"
      grep -E "^real|units done" "$L/spread.log"
      {
        echo "single:"; per_gpu $W/single; $S checks $W/single | tail -3
        echo "spread:"; per_gpu $W/spread; $S checks $W/spread | tail -3
        python3 - "$L/single.log" "$L/spread.log" "$N" <<'EOF'
import re, sys
def wall(p):
    m = re.search(r"^real\s+(\d+)m([\d.]+)s", open(p).read(), re.M)
    return int(m.group(1)) * 60 + float(m.group(2))
def run_s(p):
    m = re.search(r"units done.* in ([\d.]+) s", open(p).read())
    return float(m.group(1)) if m else float("nan")
n = int(sys.argv[3])
for label, f in (("process wall", wall), ("run (coordinator start to outputs)", run_s)):
    a, b = f(sys.argv[1]), f(sys.argv[2])
    print(f"{label}: 1 GPU {a:.1f} s, {n} GPUs {b:.1f} s, speedup {a / b:.2f}x = {a / b / n:.2f} x N")
EOF
      } | tee "$L/scaling.txt"
      echo "--- compare single (GPU 0) -> spread (GPUs 0..N-1), optimized and baseline rows"
      $B compare $W/single $W/spread > "$L/compare_single_spread.txt" 2>&1; echo "compare exit $?"
      tail -12 "$L/compare_single_spread.txt" ;;
    pergpu)
      echo "=== seed preset (optimized kernel) on every GPU: per-gpu placement"
      rm -rf $W/pergpu
      ( time timeout 400 $B run --placement per-gpu --kernels optimized --out $W/pergpu ) > "$L/pergpu.log" 2>&1; echo "pergpu exit $?"
      grep -E "^real|units done" "$L/pergpu.log"
      per_gpu $W/pergpu | tee "$L/pergpu.txt"
      $B report $W/pergpu --group-by gpu > "$L/pergpu_report.txt" 2>&1; echo "report exit $?"
      cat "$L/pergpu_report.txt" | head -40 | tee -a "$L/pergpu.txt"
      $B report $W/pergpu --group-by gpu --format json > "$L/pergpu_report.json" 2>&1 ;;
    kill)
      echo "=== coordinator + $AGENTS agent processes on $N GPU(s), the last one killed mid-run"
      rm -rf $W/kill
      PORT=50551
      $B coordinator --listen 127.0.0.1:$PORT --preset $PRESET --kernels optimized --expect-agents $AGENTS \
        --out $W/kill > "$L/kill_coordinator.log" 2>&1 &
      CPID=$!
      declare -a APIDS
      for ((g = 0; g < AGENTS; g++)); do
        $B agent --coordinator http://127.0.0.1:$PORT $(agent_device $g) --name agent$g > "$L/kill_agent$g.log" 2>&1 &
        APIDS[$g]=$!
      done
      VICTIM=$((AGENTS - 1))
      # Wait until a quarter of the units are done (a quarter of seed's 320), then kill the victim (it holds a lease then).
      T0=$(date +%s)
      for i in $(seq 1 300); do
        sleep 1
        kill -0 $CPID 2>/dev/null || break
        DONE=$($B status http://127.0.0.1:$PORT 2>/dev/null | grep -oE "[0-9]+ done" | head -1 | grep -oE "[0-9]+")
        [ -n "${DONE:-}" ] && [ "$DONE" -ge $KILL_AT ] && break
      done
      $B status http://127.0.0.1:$PORT > "$L/kill_status_before.txt" 2>&1
      echo "killing agent$VICTIM (pid ${APIDS[$VICTIM]}) at $(date +%T) with ${DONE:-?} units done"
      kill -9 "${APIDS[$VICTIM]}" 2>/dev/null || echo "(the run ended before the kill)"
      wait $CPID; CRC=$?
      echo "coordinator exit $CRC after $(( $(date +%s) - T0 )) s"
      for ((g = 0; g < AGENTS; g++)); do wait "${APIDS[$g]}" 2>/dev/null; echo "agent $g exit $?"; done
      grep -E "units done|lost|expired|requeue" "$L/kill_coordinator.log" | tail -8
      { cat "$L/kill_status_before.txt"; per_gpu $W/kill; $S checks $W/kill | tail -3; } | tee "$L/kill.txt" ;;
  esac
done
