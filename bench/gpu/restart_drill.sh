#!/usr/bin/env bash
# `decodebench run` with its agents as child processes, on a GPU, under real faults:
#   smoke    the smoke preset on the CUDA backend, agents as processes (the default) and in-process:
#            both 20/20, and what the child process costs in wall time;
#   fault    the smoke preset with DECODEBENCH_FAILPOINT=device-fault:CASE (an illegal-address
#            write right before that case, which poisons the CUDA context) and --max-attempts 2:
#            the case fails twice, the agent process is restarted after each fault, the case is
#            recorded failed and the other 19 are measured (exit 2); then --retry-failed=2 without
#            the drill reruns only that case (exit 0); before it, the retry with the drill still
#            set (round 1: the case fails again) and the same command once more (a supervisor's
#            restart: nothing runs, the journal is unchanged). The same drill with --local-agents
#            in-process shows the old behaviour: the run stops at the fault;
#   kill     the seed preset (the README's main job) with the agent process killed with SIGKILL
#            mid-run: every case once, the restart listed, the wall time beside an undisturbed run's;
#   orphan   `run` itself killed with SIGKILL mid-run: its agent process must be gone from the GPU
#            within seconds (it gets SIGTERM when its parent dies), not linger on it.
# Expects target/release/decodebench (or $DECODEBENCH_BIN); logs under $OUT (default /tmp/drill_out).
# Usage: bench/gpu/restart_drill.sh [smoke] [fault] [kill] [orphan]   (default: all four)
set -u
RESULT_DIR=${OUT:-/tmp/drill_out}
L=/tmp/drill_logs
mkdir -p "$L" "$RESULT_DIR"
trap 'cp "$L"/*.txt "$L"/*.log "$RESULT_DIR"/ 2>/dev/null' EXIT
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export DECODEBENCH_CACHE_DIR=${DECODEBENCH_CACHE_DIR:-/tmp/decodebench-cache}
B=${DECODEBENCH_BIN:-$PWD/target/release/decodebench}
W=/tmp/drill_runs
mkdir -p "$W"
STEPS=${*:-smoke fault kill orphan}
nvidia-smi --query-gpu=index,name,driver_version --format=csv,noheader | tee "$L/gpus.txt"
sha256sum "$B" | tee -a "$L/gpus.txt"

# Rows, distinct cases, statuses and agents of a run's results.csv.
rows() {
  python3 - "$1" <<'EOF'
import csv, sys, collections
rows = list(csv.DictReader(open(sys.argv[1] + "/results.csv")))
cases = collections.Counter(r["case_id"] for r in rows)
status = collections.Counter(r.get("status", "?") for r in rows)
agents = collections.Counter(r.get("agent_id", "?") for r in rows)
print(f"rows {len(rows)}, distinct cases {len(cases)}, rows per case {sorted(set(cases.values()))}, status {dict(status)}, rows per agent {dict(agents)}")
for r in rows:
    if r.get("status") != "ok":
        print(f"  {r['case_id']} {r.get('kernel')} {r.get('status')}: {r.get('message', '')[:300]}")
EOF
}

# Wall time and the run's own summary line.
summary() { grep -E "^real|units done|restarted|agent error|giving up|lease is lost now|lease expired" "$1" | cut -c1-400; }

for step in $STEPS; do
  case $step in
    smoke)
      echo "=== precompile"
      ( time timeout 200 $B precompile ) > "$L/precompile.log" 2>&1; echo "precompile exit $?"
      for mode in process in-process; do
        echo "=== smoke, --local-agents $mode"
        rm -rf "$W/smoke-$mode"
        ( time timeout 120 $B run --preset smoke --backend cuda --local-agents $mode --out "$W/smoke-$mode" ) > "$L/smoke-$mode.log" 2>&1
        echo "exit $?"; summary "$L/smoke-$mode.log"; rows "$W/smoke-$mode"
      done ;;
    fault)
      VICTIM=$($B grid --preset smoke --cases | grep -E '^[0-9a-f]{16} ' | sed -n 7p | awk '{print substr($1, 1, 12)}')
      echo "=== smoke, device fault at case $VICTIM, agents as processes, --max-attempts 2"
      rm -rf "$W/fault"
      ( time DECODEBENCH_FAILPOINT=device-fault:$VICTIM timeout 300 $B run --preset smoke --backend cuda --out "$W/fault" --max-attempts 2 ) > "$L/fault.log" 2>&1
      echo "exit $? (2 expected: one case failed)"; summary "$L/fault.log"; rows "$W/fault"
      grep -E "fault drill|unrecoverable|device lost" "$L/fault.log" | cut -c1-300 | head -8
      echo "journal header: $(head -c 160 "$W/fault/journal.dbj" | tr -c '[:print:]' ' ' | grep -o '{"format_version":[0-9]*')"
      echo "=== the same --out, --retry-failed, the drill still set (the case still faults)"
      ( time DECODEBENCH_FAILPOINT=device-fault:$VICTIM timeout 300 $B run --preset smoke --backend cuda --out "$W/fault" --max-attempts 2 --retry-failed ) > "$L/fault-retry1.log" 2>&1
      echo "exit $? (2 expected: round 1 ran, the case failed again)"; summary "$L/fault-retry1.log"; rows "$W/fault"
      size1=$(stat -c %s "$W/fault/journal.dbj")
      echo "=== the same command again, as a supervisor's restart would (round 1 already ran: nothing runs)"
      ( time DECODEBENCH_FAILPOINT=device-fault:$VICTIM timeout 300 $B run --preset smoke --backend cuda --out "$W/fault" --max-attempts 2 --retry-failed ) > "$L/fault-retry1b.log" 2>&1
      echo "exit $? (2 expected)"; summary "$L/fault-retry1b.log"
      echo "journal bytes before/after: $size1 / $(stat -c %s "$W/fault/journal.dbj")"
      grep -E "retry round|--retry-failed" "$L/fault-retry1b.log" | cut -c1-300 | head -4
      echo "=== --retry-failed=2, no drill"
      ( time timeout 300 $B run --preset smoke --backend cuda --out "$W/fault" --retry-failed=2 ) > "$L/fault-retry.log" 2>&1
      echo "exit $? (0 expected)"; summary "$L/fault-retry.log"; rows "$W/fault"
      echo "=== an agent with a bad flag exits 6 (not restarted by run or the agent Job)"
      $B agent --coordinator http://127.0.0.1:1 --gpu 0 --no-such-flag > "$L/agent-bad-flag.log" 2>&1
      echo "exit $? (6 expected)"
      echo "=== smoke, device fault at case $VICTIM, --local-agents in-process (the old behaviour)"
      rm -rf "$W/fault-inproc"
      ( time DECODEBENCH_FAILPOINT=device-fault:$VICTIM timeout 300 $B run --preset smoke --backend cuda --local-agents in-process --out "$W/fault-inproc" --max-attempts 2 ) > "$L/fault-inproc.log" 2>&1
      echo "exit $?"; summary "$L/fault-inproc.log"; rows "$W/fault-inproc" ;;
    kill)
      echo "=== seed preset, agent process killed with SIGKILL after ${KILL_AFTER_S:=60} s"
      rm -rf "$W/kill"
      ( time timeout 500 $B run --out "$W/kill" ) > "$L/kill.log" 2>&1 &
      sleep "$KILL_AFTER_S"
      RUN=$(pgrep -f "^$B run --out $W/kill" | head -1)
      CHILD=$(pgrep -P "$RUN" | head -1)
      echo "run pid $RUN, agent pid $CHILD: kill -9"
      kill -9 "$CHILD"
      wait
      summary "$L/kill.log"; rows "$W/kill" | head -3 ;;
    orphan)
      echo "=== seed preset, run itself killed with SIGKILL after 40 s"
      rm -rf "$W/orphan"
      $B run --out "$W/orphan" > "$L/orphan.log" 2>&1 &
      RUN=$!
      sleep 40
      CHILD=$(pgrep -P "$RUN" | head -1)
      echo "run pid $RUN, agent pid $CHILD; GPU processes before:"
      nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader
      kill -9 "$RUN"; T0=$(date +%s.%N)
      for _ in $(seq 600); do
        kill -0 "$CHILD" 2>/dev/null && [ "$(ps -o stat= -p "$CHILD" | cut -c1)" != Z ] || break
        sleep 0.1
      done
      echo "agent gone $(python3 -c "print(f'{$(date +%s.%N) - $T0:.1f}')") s after run was killed; GPU processes after:"
      nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader
      grep -E "journal|units done" "$L/orphan.log" | tail -2 ;;
  esac
done
